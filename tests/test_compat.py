"""Every private Ray API distrain uses works with the installed Ray: an upgrade that moves one fails here, in one
place, with distrain/_compat.py's message, not in the middle of a training run."""

from __future__ import annotations

import inspect

from distrain import _compat


def test_ray_is_the_pinned_version():
    import ray

    assert ray.__version__ == _compat.PINNED_RAY
    _compat.check_versions()


def test_every_private_name_resolves(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no cluster started here: no address recorded
    assert _compat.ray_address_on_this_machine() is None
    _compat.reload_auth_mode()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "big.bin").write_bytes(b"\0" * 10)
    assert _compat.upload_files(tmp_path, ["big.bin"], include_gitignore=True) == {"pkg/a.py": 6}
    base = _compat.controller_callback_base()
    assert inspect.isclass(base) and hasattr(base, "after_controller_start")
    _compat.quiet_train_report_log()
    assert _compat.placement_group_by_id("ab" * 18).id.hex() == "ab" * 18
    trainable = _compat.tune_function_trainable(lambda config: None)
    assert inspect.isclass(trainable) and hasattr(trainable, "cleanup")


def test_loopback_switch_is_where_ray_reads_it():
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    try:
        _compat.bind_local_cluster_to_loopback()
        assert ray_constants.ENABLE_RAY_CLUSTER is False
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
