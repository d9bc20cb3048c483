"""A PostgreSQL server of the test's own (initdb + pg_ctl), to stop and start at will.

The shared server at 127.0.0.1:5432 serves every engineer's tests and must never be stopped;
outage tests stop this one instead. Run as root, the server runs as `postgres` (initdb refuses
root), in a directory that user can reach; it is removed afterwards.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

_BIN_DIRS = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
PG_BIN = Path(_BIN_DIRS[-1]) if _BIN_DIRS else None
available = PG_BIN is not None and (PG_BIN / "initdb").exists()
MISSING = "initdb/pg_ctl not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnPostgres:
    def __init__(self) -> None:
        # Not tmp_path: pytest's base directory is private to root, out of the server's reach.
        self.root = Path(tempfile.mkdtemp(prefix="wk-own-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.dsn = f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def _run(self, *argv: str, timeout_s: float = 60) -> None:
        cmd = [str(PG_BIN / argv[0]), *argv[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout_s)

    def init(self) -> OwnPostgres:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                       "max_connections = 60\n")
        return self.start()

    def start(self) -> OwnPostgres:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "start")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
pgbouncer_available = os.path.exists(PGBOUNCER)
PGBOUNCER_MISSING = "pgbouncer not installed (apt-get install pgbouncer)"


class OwnPgBouncer:
    """A pgbouncer in transaction pooling mode in front of `target` (host, port, dbname)."""

    def __init__(self, host: str, port: int, dbname: str, pool_size: int = 2) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="wk-own-pgbouncer-"))
        self.port = free_port()
        self.dsn = f"host=127.0.0.1 port={self.port} dbname={dbname} user=postgres"
        (self.root / "users.txt").write_text('"postgres" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            f"[databases]\n{dbname} = host={host} port={port} dbname={dbname}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            f"unix_socket_dir =\nauth_type = trust\nauth_file = {self.root}/users.txt\n"
            f"pool_mode = transaction\ndefault_pool_size = {pool_size}\n"
            "max_client_conn = 200\nignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.root}/pgbouncer.log\n")
        self._as_postgres = os.geteuid() == 0  # pgbouncer refuses to run as root
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        self.proc: subprocess.Popen | None = None

    def start(self) -> OwnPgBouncer:
        cmd = [PGBOUNCER, str(self.root / "pgbouncer.ini")]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def destroy(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


class CuttableProxy:
    """A TCP proxy to PostgreSQL for one daemon: `cut()` is that host losing the network to
    the database (open connections dropped, new ones refused) while the others keep it."""

    def __init__(self, host: str, port: int) -> None:
        import threading

        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_off = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def dsn(self, dbname: str, user: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}"

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_off:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.cut_off = True
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self.cut_off = False

    def close(self) -> None:
        self.cut()
        self.listener.close()
