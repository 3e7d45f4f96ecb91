"""A copied lab's Samba home is pointed at its new place before Samba starts: smb.conf names
absolute paths, and a copy that kept them would open the original's database and pid files."""

from __future__ import annotations

from pathlib import Path

from certsync_lab.samba import ORIGIN_FILE, SambaDC


def test_a_copied_home_is_pointed_at_its_new_place(tmp_path: Path) -> None:
    original = tmp_path / "cached" / "samba"
    copy = tmp_path / "copy" / "samba"
    (copy / "etc").mkdir(parents=True)
    (copy / "etc" / "smb.conf").write_text(
        f"[global]\n\tprivate dir = {original}/private\n\tpid directory = {original}/run\n"
    )
    (copy / ORIGIN_FILE).write_text(f"{original}\n")

    SambaDC(home=copy).ensure_provisioned()

    conf = (copy / "etc" / "smb.conf").read_text()
    assert str(original) not in conf and f"private dir = {copy}/private" in conf
    assert (copy / ORIGIN_FILE).read_text().strip() == str(copy)
    SambaDC(home=copy).ensure_provisioned()  # in place already: left as it is
    assert (copy / "etc" / "smb.conf").read_text() == conf
