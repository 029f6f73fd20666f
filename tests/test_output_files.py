"""verify --report, bench --json / --plot, fit --out, evaluate --plot: only a file gpu-pipeline wrote
is replaced, and a refusal comes before any work (``gpu_pipeline/outputs/files.py``)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from gpu_pipeline.cli import app
from gpu_pipeline.errors import UsageError
from gpu_pipeline.outputs.files import CannotWrite, check_target, is_our_json, is_our_png, replace_with

runner = CliRunner()


@pytest.fixture(scope="module")
def classes(tmp_path_factory, bundled_data_dir) -> Path:
    """Four EuroSAT tiles of each of three classes: a tree for fit and evaluate, images for verify and bench."""
    tree = tmp_path_factory.mktemp("tree")
    for name in ("Forest", "River", "SeaLake"):
        (tree / name).mkdir()
        for path in sorted((bundled_data_dir / "eurosat" / name).iterdir())[:4]:
            shutil.copy(path, tree / name / path.name)
    return tree


def command(kind: str, tree: Path, target: Path) -> list[str]:
    return {
        "verify --report": ["verify", str(tree), "-b", "numba", "--report", str(target)],
        "bench --json": ["bench", str(tree), "-b", "reference", "--repeat", "1", "--no-scaling", "--json", str(target)],
        "bench --plot": ["bench", str(tree), "-b", "reference", "--repeat", "1", "--no-scaling", "--plot", str(target)],
        "fit --out": ["fit", str(tree), "--out", str(target), "-b", "reference"],
        "evaluate --plot": ["evaluate", str(tree), "--model", "eurosat", "-b", "reference", "--plot", str(target)],
    }[kind]


KINDS = ["verify --report", "bench --json", "bench --plot", "fit --out", "evaluate --plot"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_the_tool_did_not_write_is_refused_and_left_alone(kind, classes, tmp_path):
    if "plot" in kind:
        pytest.importorskip("matplotlib")
    notes = tmp_path / ("notes.png" if "plot" in kind else "notes.txt")  # (a plot is named .png)
    notes.write_text("my notes\n")
    image = next((classes / "River").iterdir())
    before = image.read_bytes()
    for target in (notes, image):
        result = runner.invoke(app, command(kind, classes, target))
        assert result.exit_code == 2, result.output
        option = kind.split()[1]
        if "plot" in kind and target == image:  # a JPEG
            assert "the plot is a PNG: name it .png" in result.output
        else:
            assert f"{option} {target} exists and was not written by gpu-pipeline" in result.output
    assert notes.read_text() == "my notes\n" and image.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == [notes.name]  # nothing else written


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_the_tool_wrote_is_replaced(kind, classes, tmp_path):
    if "plot" in kind:
        pytest.importorskip("matplotlib")
    target = tmp_path / ("out.png" if "plot" in kind else "out.json")
    for attempt in range(2):
        result = runner.invoke(app, command(kind, classes, target))
        assert result.exit_code == 0, result.output
        assert (is_our_png if "plot" in kind else is_our_json)(target)
    assert sorted(path.name for path in tmp_path.iterdir()) == [target.name]  # no temporary left


def test_a_file_of_ours_that_is_an_input_is_refused(classes, tmp_path):
    """A model given as --model, or an edge map of ours given as an image, is ours but an input."""
    model = tmp_path / "m.json"
    assert runner.invoke(app, command("fit --out", classes, model) + ["--test-fraction", "0"]).exit_code == 0
    before = model.read_bytes()
    result = runner.invoke(app, ["verify", str(classes / "River"), "-b", "numba", "--model", str(model),
                                 "--report", str(model)])
    assert result.exit_code == 2 and f"--report {model} is one of the inputs" in result.output, result.output
    assert model.read_bytes() == before
    pytest.importorskip("matplotlib")
    plot = tmp_path / "plot.png"
    assert runner.invoke(app, command("evaluate --plot", classes, plot)).exit_code == 0  # a plot of ours
    shutil.copy(plot, classes / "River" / "plot.png")  # ... which is now an image of the tree
    try:
        result = runner.invoke(app, command("evaluate --plot", classes, classes / "River" / "plot.png"))
        assert result.exit_code == 2 and "is one of the inputs" in result.output, result.output
        result = runner.invoke(app, command("bench --plot", classes / "River", classes / "River" / "plot.png"))
        assert result.exit_code == 2 and "is one of the inputs" in result.output, result.output
    finally:
        (classes / "River" / "plot.png").unlink()


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_of_ours_in_a_folder_that_cannot_be_written_is_refused_before_any_work(kind, classes, tmp_path,
                                                                                     monkeypatch):
    """A report, model or plot of ours from an earlier run, in a folder made read-only since: the
    folder was checked only for a new file, so the command did all its work and then exited 3, as if
    the disk were full. Replacing the file needs a temporary in that folder: exit 2, nothing done."""
    if "plot" in kind:
        pytest.importorskip("matplotlib")
    target = tmp_path / "kept" / ("out.png" if "plot" in kind else "out.json")
    target.parent.mkdir()
    assert runner.invoke(app, command(kind, classes, target)).exit_code == 0  # ours, from an earlier run
    before = target.read_bytes()
    target.parent.chmod(0o555)
    real_access = os.access  # root passes every permission check: the folder is refused as for anyone else
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
        False if Path(path) == target.parent and mode & os.W_OK else real_access(path, mode, **kwargs)))
    try:
        result = runner.invoke(app, command(kind, classes, target))
    finally:
        target.parent.chmod(0o755)
    assert result.exit_code == 2, result.output
    assert f"{kind.split()[1]} {target}: cannot write in {target.parent}" in result.output
    assert "images" not in result.stdout  # refused before any image was processed
    assert target.read_bytes() == before


def test_a_symbolic_link_to_a_file_of_ours_stays_a_link(classes, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    report = tmp_path / "elsewhere" / "report.json"
    assert runner.invoke(app, command("verify --report", classes, report)).exit_code == 0
    (tmp_path / "link.json").symlink_to(report)
    report.write_text(report.read_text().replace('"identical": true', '"identical": "stale"'))
    assert runner.invoke(app, command("verify --report", classes, tmp_path / "link.json")).exit_code == 0
    assert (tmp_path / "link.json").is_symlink() and '"identical": true' in report.read_text()


def test_a_symbolic_link_that_leads_nowhere_is_refused_and_nothing_is_made_where_it_points(tmp_path):
    """A dangling link is something that exists, not an absent name: taken for one, the report was
    written where the link points (here a name in another folder), through a link nobody had made for it."""
    link = tmp_path / "report.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(UsageError, match=f"--report {link} exists and was not written by gpu-pipeline"):
        check_target(link, "--report", is_our_json)
    assert link.is_symlink() and sorted(path.name for path in tmp_path.iterdir()) == ["report.json"]


def test_a_link_to_a_file_of_ours_is_refused_when_the_files_own_folder_cannot_be_written(tmp_path, monkeypatch):
    """The temporary that replaces a file goes beside the file, not beside the link to it: the link's
    folder was checked, so the command did all its work and then exited 3 (cannot write)."""
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "report.json").write_text('{"schema": "gpu-pipeline-verify/1"}\n')
    link = tmp_path / "report.json"
    link.symlink_to(kept / "report.json")
    real_access = os.access  # root passes every permission check: the folder is refused as for anyone else
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
        False if Path(path) == kept and mode & os.W_OK else real_access(path, mode, **kwargs)))
    with pytest.raises(UsageError, match=f"--report {link}: cannot write in {kept}$"):
        check_target(link, "--report", is_our_json)
    check_target(kept.parent / "new.json", "--report", is_our_json)  # the link's own folder may be written

def test_a_folder_is_refused(classes, tmp_path):
    result = runner.invoke(app, command("verify --report", classes, tmp_path))
    assert result.exit_code == 2 and f"--report {tmp_path} is a folder" in result.output


def test_what_counts_as_ours(tmp_path):
    ours = tmp_path / "model.json"
    ours.write_text('{\n "format": "gpu-pipeline label model",\n "format_version": 2}\n')
    report = tmp_path / "report.json"
    report.write_text('{\n  "schema": "gpu-pipeline-verify/1"}\n')
    other = tmp_path / "other.json"
    other.write_text('{"schema": "someone-else/1", "note": "gpu-pipeline"}\n')
    assert is_our_json(ours) and is_our_json(report) and not is_our_json(other)
    plain = tmp_path / "plain.png"
    Image.new("L", (4, 4)).save(plain)
    assert not is_our_png(plain) and not is_our_png(ours) and not is_our_png(tmp_path / "missing.png")
    with pytest.raises(UsageError, match="not written by gpu-pipeline"):
        check_target(other, "--json", is_our_json)
    with pytest.raises(UsageError, match="does not exist"):
        check_target(ours / "inside.json", "--json", is_our_json)  # below a file
    with pytest.raises(UsageError, match=f"--report {tmp_path}/new/report.json: the folder {tmp_path}/new does not exist"):
        check_target(tmp_path / "new/report.json", "--report", is_our_json)
    check_target(tmp_path / "report.json", "--report", is_our_json)


def test_a_png_another_program_drew_is_not_ours(tmp_path):
    """Only a ``Software`` chunk naming gpu-pipeline makes a PNG ours: a matplotlib plot or a GIMP
    picture, which carry one of their own, is the user's."""
    from PIL.PngImagePlugin import PngInfo

    for index, (software, ours) in enumerate([("Matplotlib version3.9.0, https://matplotlib.org/", False),
                                              ("GIMP 2.10.36", False), ("gpu-pipeline 0.1.0", True),
                                              ("GIMP 2.10.36 (edited from a gpu-pipeline 0.1.0 plot)", False)]):
        info = PngInfo()
        info.add_text("Software", software)
        path = tmp_path / f"plot{index}.png"
        Image.new("L", (4, 4)).save(path, pnginfo=info)
        assert is_our_png(path) is ours, software


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    """Reading a FIFO to see whether it is ours waits for a writer: the command hung before any work."""
    import os
    import threading

    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)
    refusals = []

    def check():
        try:
            check_target(fifo, "--report", is_our_json)
        except UsageError as exc:
            refusals.append(str(exc))

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # blocked opening it: a writer that comes and goes lets it end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail("check_target opened the FIFO")
    assert len(refusals) == 1 and "was not written by gpu-pipeline" in refusals[0]


def test_a_name_whose_folder_was_replaced_by_a_file_no_longer_names_the_file(tmp_path):
    """still_names, the check that an output and its lock are still the files written: a folder on the
    way replaced by a file (NotADirectoryError) is a name that leads nowhere, as a removed file is; raised,
    the checks took it for a folder made unsearchable and went on writing to a file no name reached."""
    from gpu_pipeline.outputs.files import still_names

    folder = tmp_path / "night"
    folder.mkdir()
    out = folder / "out.jsonl"
    out.write_text("")
    descriptor = os.open(out, os.O_RDONLY)
    try:
        assert still_names(out, descriptor)
        folder.rename(tmp_path / "night.old")
        assert not still_names(out, descriptor)  # removed
        folder.write_text("a file now")
        assert not still_names(out, descriptor)  # a file on the way
    finally:
        os.close(descriptor)

def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text('{"schema": "gpu-pipeline-verify/1", "old": true}\n')

    def disk_full(temporary: Path) -> None:
        temporary.write_text("half a rep")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CannotWrite, match="--report: cannot write .*No space left on device"):  # exit 3
        replace_with(target, "--report", disk_full, is_our_json)
    assert target.read_text() == '{"schema": "gpu-pipeline-verify/1", "old": true}\n'
    assert [path.name for path in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, stop):
    """Ctrl-C, or a signal ended as SystemExit, while the temporary is written: the old file is
    kept and the temporary removed (an Exception alone was cleaned up: the half report stayed)."""
    from gpu_pipeline.outputs.files import write_replacing

    target = tmp_path / "report.json"
    target.write_text("old\n")

    def interrupted(temporary: Path) -> None:
        temporary.write_text("half a rep")
        raise stop

    with pytest.raises(stop):
        write_replacing(target, interrupted)
    assert target.read_text() == "old\n" and [path.name for path in tmp_path.iterdir()] == ["report.json"]

@pytest.mark.parametrize("made", ["records", "our report"])
def test_a_file_another_program_made_while_the_command_ran_is_left_alone(tmp_path, made):
    """check_target looks once, before the work: a run started meanwhile with --out on verify's
    --report name had its records replaced by the report when verify finished."""
    target = tmp_path / "X.jsonl"
    check_target(target, "--report", is_our_json)  # absent: may be written

    def slow_write(temporary: Path) -> None:
        temporary.write_text('{"schema": "gpu-pipeline-verify/1", "new": true}\n')
        # meanwhile, another program writes there
        target.write_text('{"path": "/a.png"}\n' if made == "records" else '{"schema": "gpu-pipeline-verify/1"}\n')

    if made == "records":
        with pytest.raises(UsageError, match="--report .*X.jsonl was made by another program while this one ran") as refused:
            replace_with(target, "--report", slow_write, is_our_json)
        assert not isinstance(refused.value, CannotWrite)  # a refusal: exit 2, not a failed write
        assert target.read_text() == '{"path": "/a.png"}\n'
    else:  # ours: replaced, as it would have been had it been there before
        replace_with(target, "--report", slow_write, is_our_json)
        assert '"new": true' in target.read_text()
    assert [path.name for path in tmp_path.iterdir()] == ["X.jsonl"]


def test_a_temporary_a_killed_command_left_is_removed_when_the_file_is_next_written(tmp_path):
    """fit --out, verify --report, bench --json: a SIGKILL between the write and the rename left
    ``.NAME.PID.tmp`` for good (only ``run`` swept its own)."""
    import os
    import subprocess
    import time

    from gpu_pipeline.outputs.files import temporary_name

    child = subprocess.Popen(["true"])
    child.wait()  # a PID no process has now
    target = tmp_path / "model.json"
    left = tmp_path / temporary_name(target.name, child.pid)
    other = tmp_path / temporary_name("notes.json", child.pid)  # another file's: not this command's to judge
    for path in (left, other):
        path.write_text('{"half": ')
        os.utime(path, (time.time() - 3600,) * 2)
    replace_with(target, "--out", lambda temporary: temporary.write_text("{}\n"), lambda path: True)
    assert target.read_text() == "{}\n"
    assert not left.exists() and other.exists()


@pytest.mark.parametrize("pid", ["another user's", "past any PID"])
def test_a_temporary_whose_process_cannot_be_told_gone_is_left_alone(tmp_path, monkeypatch, pid):
    """A PID this process may not signal (another user's live run, EPERM) or no PID at all (too large
    for kill): whether its process runs cannot be told, so its temporary stays however old it is."""
    import time

    from gpu_pipeline.outputs import files

    number = 4242 if pid == "another user's" else 2 ** 64
    real_kill = os.kill

    def kill(target, signal):  # (root may signal any process: another user's is made up)
        if target == 4242:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real_kill(target, signal)

    monkeypatch.setattr(os, "kill", kill)
    left = tmp_path / files.temporary_name("model.json", number)
    left.write_text('{"half": ')
    os.utime(left, (time.time() - 3600,) * 2)
    files.remove_stale_temporaries(tmp_path, files.temporaries_of("model.json"))
    assert left.read_text() == '{"half": '

def test_a_replaced_file_keeps_its_permissions(tmp_path):
    """The replacement was made 0644 and renamed into place: a report its owner had made private
    (0600) became readable by everyone; a group-writable one lost group write."""
    import os
    import stat

    for mode in (0o600, 0o664, 0o640):
        target = tmp_path / f"report{mode:o}.json"
        target.write_text('{"schema": "gpu-pipeline-verify/1"}\n')
        target.chmod(mode)
        replace_with(target, "--report", lambda temporary: temporary.write_text('{"schema": "gpu-pipeline-verify/1", "new": 1}\n'),
                     is_our_json)
        assert stat.S_IMODE(os.stat(target).st_mode) == mode and "new" in target.read_text()


@pytest.mark.parametrize("mode, kept", [(0o640, 0o600), (0o664, 0o644), (0o6755, 0o755)])
def test_a_replacement_whose_group_cannot_be_kept_gives_that_group_what_others_had(tmp_path, monkeypatch, mode,
                                                                                     kept):
    """The group's bits were copied to a replacement in this user's group where its group could not be
    set (another user's dataset part, report): a part for group team, 0640, became readable by this
    user's own group. Set-user-ID and set-group-ID bits were copied too."""
    import os
    import stat

    from gpu_pipeline.outputs import files

    replaced = tmp_path / "replaced"
    replaced.write_text("old\n")
    replaced.chmod(mode)
    status = os.stat(replaced)
    elsewhere = os.stat_result((*status[:5], status.st_gid + 1, *status[6:]))  # a group not this file's
    monkeypatch.setattr(os, "chown", lambda *args: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted")))
    temporary = tmp_path / "temporary"
    temporary.write_text("new\n")
    files.keep_mode(elsewhere, temporary)
    assert stat.S_IMODE(os.stat(temporary).st_mode) == kept
    files.keep_mode(status, temporary)  # the same group: its bits as they were, less set-ID
    assert stat.S_IMODE(os.stat(temporary).st_mode) == mode & 0o777


def test_a_private_files_replacement_is_never_readable_by_others_while_it_is_written(tmp_path):
    """The permissions were set after the new content was written: another user could open the
    temporary (0644) meanwhile and read it for as long as they kept it open."""
    import os
    import stat

    from gpu_pipeline.outputs.files import write_replacing

    for mode in (0o600, 0o640):
        target = tmp_path / f"report{mode:o}.json"
        target.write_text("old secret\n")
        target.chmod(mode)
        seen = []

        def write(temporary):
            seen.append(stat.S_IMODE(os.stat(temporary).st_mode))
            temporary.write_text("new secret\n")

        write_replacing(target, write)
        assert seen == [mode] and stat.S_IMODE(os.stat(target).st_mode) == mode


def test_bytes_written_through_the_new_descriptor_replace_the_file_keeping_its_mode(tmp_path):
    """An edge map's bytes go through the descriptor that created the temporary (no second open)."""
    import os
    import stat

    from gpu_pipeline.outputs.files import write_replacing

    target = tmp_path / "a.png.edges.png"
    target.write_bytes(b"old")
    target.chmod(0o640)
    write_replacing(target, b"new bytes")
    assert target.read_bytes() == b"new bytes" and stat.S_IMODE(os.stat(target).st_mode) == 0o640
    write_replacing(tmp_path / "b.png.edges.png", b"")  # nothing to write: an empty file all the same
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png.edges.png", "b.png.edges.png"]


@pytest.mark.parametrize("write", [b"new", "callable"])
def test_a_temporary_a_dead_process_with_this_pid_left_is_replaced(tmp_path, write):
    """A SIGKILLed run's temporary whose PID this process now has: the exclusive create meets it."""
    import os

    from gpu_pipeline.outputs.files import temporary_name, write_replacing

    target = tmp_path / "a.png.edges.png"
    (tmp_path / temporary_name(target.name, os.getpid())).write_bytes(b"half a map")
    write_replacing(target, b"new" if write == b"new" else lambda temporary: temporary.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_bytes_that_do_not_fit_leave_the_old_file_and_no_temporary(tmp_path):
    """A write that fails half-way (here past the file size limit, as on a full disk) is an error;
    the old file keeps its bytes and the temporary is gone."""
    import resource

    from gpu_pipeline.outputs.files import write_replacing

    target = tmp_path / "a.png.edges.png"
    target.write_bytes(b"old map")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # (Python ignores SIGXFSZ: the write fails)
    try:
        with pytest.raises(OSError) as raised:
            write_replacing(target, b"x" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert raised.value.errno == errno.EFBIG
    assert target.read_bytes() == b"old map" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_long_names_that_differ_only_in_their_first_bytes_get_temporaries_of_their_own():
    """A temporary near the name limit keeps the name's end; names of 236 to 255 bytes that differ only
    at their start got one temporary, and edge maps saved at once (on threads) took each other's."""
    import os

    from gpu_pipeline.outputs.files import NAME_MAX, temporary_name, temporaries_of

    names = ["A" + "N" * 239 + ".png.edges.png", "B" + "N" * 239 + ".png.edges.png", "é" + "N" * 238 + ".png.edges.png"]
    found = [temporary_name(name, 4194304) for name in names]
    assert len(set(found)) == 3
    assert all(len(os.fsencode(name)) == NAME_MAX and name.endswith(".png.edges.png.4194304.tmp") for name in found)
    assert temporary_name("short.png", 7) == ".short.png.7.tmp"  # names with room are kept whole
    target = found[0][1:-len(".4194304.tmp")]  # what the sweep reads back from the file's name
    assert temporaries_of(names[0])(target, 4194304) and not temporaries_of(names[1])(target, 4194304)


def test_a_private_files_replacement_is_private_from_its_creation(tmp_path, monkeypatch):
    """Created 0644, then given the replaced file's mode: another user could open the temporary in
    between and read through that descriptor everything written into it later."""
    import os
    import stat

    from gpu_pipeline.outputs import files

    target = tmp_path / "report.json"
    target.write_text("old secret\n")
    target.chmod(0o600)
    created = []
    real_keep_mode = files.keep_mode

    def keep_mode(replaced, temporary):
        created.append(stat.S_IMODE(os.stat(temporary).st_mode))
        real_keep_mode(replaced, temporary)

    monkeypatch.setattr(files, "keep_mode", keep_mode)
    files.write_replacing(target, b"new secret\n")
    assert created == [0o600] and target.read_bytes() == b"new secret\n"


@pytest.mark.parametrize("what", ["report", "settings", "settings put back", "relative report"])
def test_reports_and_the_settings_record_are_on_the_disk_before_their_rename(tmp_path, monkeypatch, what):
    """A rename can reach the disk before the bytes do: after a power cut the settings record was
    empty, and every later run refused the output for it. The new bytes are synced before the
    rename, and the folder after it."""
    import os

    from gpu_pipeline.engine.job import _put_back_settings, write_settings
    from gpu_pipeline.outputs.files import replace_with_report

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(descriptor):
        events.append(("sync", os.fstat(descriptor).st_ino))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("rename", os.stat(source).st_ino))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.chdir(tmp_path)
    if what == "report":
        replace_with_report(tmp_path / "report.json", "--report", {"a": 1})
    elif what == "relative report":
        replace_with_report(Path("report.json"), "--report", {"a": 1})
    elif what == "settings":
        write_settings(str(tmp_path / "out.jsonl"), {"a": 1})
    else:
        (tmp_path / "out.jsonl.settings.json").write_text("{}\n")
        _put_back_settings(str(tmp_path / "out.jsonl"), b'{"a": 1}\n')
    (_, new), = [event for event in events if event[0] == "rename"]
    assert events == [("sync", new), ("rename", new), ("sync", tmp_path.stat().st_ino)]


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077, 0o000])
def test_a_new_file_gets_the_bits_a_plain_open_gives_under_the_umask(tmp_path, umask, mask):
    """A new settings record, report or edge map was created 0644 less the umask: under umask 002
    (a folder shared by a group) it was 0644 beside the records' 0664, so the group could not
    write it; 0666 less the umask, as open(path, "w") gives."""
    import stat

    from gpu_pipeline.outputs.files import write_replacing

    umask(mask)
    (tmp_path / "plain").write_text("")
    write_replacing(tmp_path / "new.png.edges.png", b"new")
    write_replacing(tmp_path / "new.json", lambda temporary: temporary.write_text("{}"), durable=True)
    plain = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    assert plain == 0o666 & ~mask
    assert [stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in ("new.png.edges.png", "new.json")] == [plain] * 2
