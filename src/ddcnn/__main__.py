"""``python -m ddcnn`` (what ``torchrun -m ddcnn`` runs) is the ``ddcnn`` command."""

from ddcnn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
