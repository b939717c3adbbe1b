"""files.atomic_file / atomic_directory at the edge of what the output checks can see: a place where nothing can be
created although the checks passed (root on /proc, a read-only or full mount) is one UserError line, nothing left
behind; a symbolic link in place of a directory written whole is the user's and is never replaced."""

from __future__ import annotations

import errno
import os

import pytest

from dora_cli.errors import UserError
from dora_cli.files import atomic_directory, atomic_file, write_text


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES, errno.ENOENT])
@pytest.mark.parametrize("writer", ["file", "directory"])
def test_a_place_where_nothing_can_be_created_is_one_user_error(tmp_path, monkeypatch, code, writer):
    def refuse(*_a, **_k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "mkdir", refuse)  # Path.mkdir and mkstemp's directory both end here or in open
    monkeypatch.setattr("tempfile._mkstemp_inner", refuse)
    target = tmp_path / "sub" / ("out.json" if writer == "file" else "out")
    filled = []
    with pytest.raises(UserError, match="cannot be written"):
        if writer == "file":
            atomic_file(target, lambda tmp: filled.append(tmp))
        else:
            atomic_directory(target, lambda tmp: filled.append(tmp))
    assert filled == [] and list(tmp_path.iterdir()) == []


def test_a_link_in_place_of_a_directory_written_whole_is_never_replaced(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    write_text(mine / "notes.txt", "x")
    link = tmp_path / "out"
    link.symlink_to(mine)
    filled = []
    with pytest.raises(UserError, match="symbolic link"):
        atomic_directory(link, lambda tmp: filled.append(tmp))
    assert filled == [] and link.is_symlink() and (mine / "notes.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]
