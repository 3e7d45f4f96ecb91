"""`python -m certsync_lab.emulator ...`"""

from certsync_lab.emulator.cli import emulator

if __name__ == "__main__":
    emulator(prog_name="python -m certsync_lab.emulator")
