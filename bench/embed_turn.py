"""How long embedding holds the daemon's loop when a large memory starts unembedded.

    .venv/bin/python bench/embed_turn.py [--entries N] [--chars C]

Writes N entries of C characters (by default 44 of 240,000: the 10 MB namespace of
tests/test_memory_backup.py) into a fresh store, then runs the steward's indexer turn by turn
as the daemon's loop does and prints the longest turn and the total. Beside it, in the same
run: the cost of the former first turn, every entry's whole text tokenized at once (the
tokenizer reads a text to its end before any truncation). Needs the [semantic] extra.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor.memory.embeddings import entry_text, load_embedder  # noqa: E402
from supervisor.memory.semantic_index import SemanticIndex, SemanticIndexer  # noqa: E402
from supervisor.memory.settings import StewardSettings  # noqa: E402
from supervisor.memory.store import MemoryStore, Op, Update  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=44)
    parser.add_argument("--chars", type=int, default=240_000)
    args = parser.parse_args()
    embedder, why = load_embedder()
    if embedder is None:
        print(f"cannot measure: {why}", file=sys.stderr)
        return 1
    words = "the steward embeds each entry after the write is acknowledged ".split()
    text = " ".join(words[i % len(words)] for i in range(args.chars // 6))[:args.chars]
    with tempfile.TemporaryDirectory() as tmp, MemoryStore(Path(tmp)) as store:
        store.apply_batch([Update(op=Op.PUT, namespace="big", key=f"k{i:03d}", value=text,
                                  agent="bench", run_id="r") for i in range(args.entries)],
                          grants={"bench": ["*"]})
        indexer = SemanticIndexer.open(store.path, StewardSettings(), SemanticIndex(embedder))
        indexer.start()
        turns_s = []
        while True:
            started = time.monotonic()
            embedded = indexer.embed_pending()
            turns_s.append(time.monotonic() - started)
            if not embedded and not indexer.dirty:
                break
        indexer.close()
    started = time.monotonic()
    load_embedder()[0]._tokenizer.encode_batch([entry_text(text)] * args.entries,
                                               add_special_tokens=False)
    former_s = time.monotonic() - started
    print(f"{args.entries} entries of {args.chars:,} characters; load average "
          f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    print(f"now:    {len(turns_s)} turns, longest {max(turns_s) * 1000:,.0f} ms, "
          f"total {sum(turns_s) * 1000:,.0f} ms")
    print(f"former: one turn of at least {former_s * 1000:,.0f} ms (tokenizing whole texts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
