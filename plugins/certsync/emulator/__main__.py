"""`python -m certsync.emulator ...`"""

from certsync.emulator.cli import emulator

if __name__ == "__main__":
    emulator(prog_name="python -m certsync.emulator")
