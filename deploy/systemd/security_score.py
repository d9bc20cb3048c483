"""Print the `systemd-analyze security` exposure of watchkeeper.service and check it is OK.

By default the unit is loaded into a throwaway systemd sandbox (tests/sandbox_systemd.py, needs
root) and analysed by that running manager, as on a real host. --offline analyses the file with
`systemd-analyze security --offline=true` on this machine instead, without root.

    python deploy/systemd/security_score.py [--offline] [--threshold 2.3]

Exit status 1 when the exposure is above the threshold.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNIT = HERE / "watchkeeper.service"
OVERALL = re.compile(r"Overall exposure level for \S+: (\d+\.\d+) (\S+)")


def analyse_offline(unit: Path) -> str:
    result = subprocess.run(
        ["systemd-analyze", "security", "--no-pager", "--offline=true", str(unit)],
        capture_output=True, text=True)
    return result.stdout + result.stderr


def analyse_in_sandbox(unit: Path) -> str:
    sys.path.insert(0, str(HERE.parent.parent / "tests"))
    from sandbox_systemd import SystemdSandbox

    available, reason = SystemdSandbox.available()
    if not available:
        sys.exit(f"security_score: {reason}; try --offline")
    with tempfile.TemporaryDirectory(prefix="wk-security-") as tmp, \
            SystemdSandbox(Path(tmp)) as box:
        box.install_unit(unit.name, unit.read_text())
        result = box.run("systemd-analyze", "security", "--no-pager", unit.name, check=False)
        return result.stdout + result.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true",
                        help="analyse the file on this machine instead of in a sandbox")
    parser.add_argument("--threshold", type=float, default=2.3,
                        help="highest acceptable exposure (default 2.3, what issue #19 "
                             "promises; 3.0 is the top of 'OK')")
    parser.add_argument("--unit", type=Path, default=UNIT)
    args = parser.parse_args(argv)
    report = analyse_offline(args.unit) if args.offline else analyse_in_sandbox(args.unit)
    print(report)
    match = OVERALL.search(report)
    if match is None:
        print("security_score: no overall exposure line in the report", file=sys.stderr)
        return 2
    exposure = float(match.group(1))
    print(f"exposure {exposure} ({match.group(2)}), threshold {args.threshold}")
    return 0 if exposure <= args.threshold else 1


if __name__ == "__main__":
    sys.exit(main())
