import os
import stat

import pytest

from gptx.atomic import atomic_write


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    # On a shared filesystem others read a run as the umask allows, as with any file written plainly.
    before = os.umask(umask)
    try:
        atomic_write(tmp_path / "latest", b"iter_0000001")
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "latest").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == mode
    assert (tmp_path / "latest").read_bytes() == b"iter_0000001"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_a_write_that_fails_leaves_the_old_file_no_temporary_and_no_open_descriptor(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    target.write_bytes(b"iter_0000001")

    def refuse(fd, mode):  # as on a mount that takes no modes (some CIFS and vfat)
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "fchmod", refuse)
    open_before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(PermissionError):
            atomic_write(target, b"iter_0000002")
    assert len(os.listdir("/proc/self/fd")) == open_before
    assert target.read_bytes() == b"iter_0000001"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
