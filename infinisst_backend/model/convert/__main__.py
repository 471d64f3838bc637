"""``python -m infinisst_backend.model.convert``: the command line of :mod:`.cli`."""

from infinisst_backend.model.convert.cli import main

if __name__ == "__main__":
    main()
