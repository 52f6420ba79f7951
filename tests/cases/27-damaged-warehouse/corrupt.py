"""Damage a published warehouse the way a full disk or a bad sector does (duckdb/duckdb#9667).

usage: python corrupt.py WAREHOUSE truncate   -> cut the file to 1 MiB
       python corrupt.py WAREHOUSE scribble   -> 4 KiB of random bytes in every 256 KiB block below 2,000,000

(The case's corrupt.py, laid out for the project's linter; the same damage.)
"""

import os
import sys

path, how = sys.argv[1], sys.argv[2]
if how == "truncate":
    os.truncate(path, 1 << 20)
else:
    with open(path, "r+b") as f:
        for off in range(262144 + 12288, 2_000_000, 262144):
            f.seek(off)
            f.write(os.urandom(4096))
