"""``python -m miniresnet.bench``: see :func:`miniresnet.bench.cli.main`."""

from miniresnet.bench.cli import main

if __name__ == "__main__":  # importing this module (as the wheel check does) runs nothing
    main()
