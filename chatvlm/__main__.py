"""``python -m chatvlm ...`` is the ``chatvlm`` command."""
from chatvlm.cli import main

if __name__ == "__main__":
    main()
