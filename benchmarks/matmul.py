"""L-Matmul speed against torch.matmul: ``python benchmarks/matmul.py [lmul bench options]``.

Same as ``lmul bench`` (see lmul/bench.py): prints the table; ``--out benchmarks/RESULTS.md``
(with ``--section``) writes it into the committed results.
"""

from __future__ import annotations

import argparse
import sys

from lmul.bench import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
