"""What every other part of the library uses: the one error type for user-facing failures (``errors``) and
the file helpers (atomic writes, safe names, threads and memory of this machine, ``files``).

May import: the standard library and numpy only; nothing else of SDMOrganSegLib.
"""
