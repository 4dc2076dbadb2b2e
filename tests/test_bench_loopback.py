"""``lu2k bench loopback`` runs end to end with each application (Python and C) and names bad
arguments; its figures are measurements and are not checked here."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lu2k.cli import bench
from lu2k.errors import Lu2kError

pytestmark = pytest.mark.timeout(300)


@pytest.mark.skipif(bench.c_app_unavailable() is not None, reason=f"C application: {bench.c_app_unavailable()}")
def test_both_applications_move_every_message_through_two_daemons() -> None:
    rows = bench.run_loopback([64, 4096], {64: 3000, 4096: 2000}, 128, apps=("python", "c"))
    assert [(r["size"], r["app"], r["count"]) for r in rows] == [(64, "python", 3000), (64, "c", 3000),
                                                                 (4096, "python", 2000), (4096, "c", 2000)]
    for r in rows:
        assert r["msgs_per_s"] > 0 and r["baseline_msgs_per_s"] > 0
    # One raw baseline per size, shown beside both applications.
    assert rows[0]["baseline_msgs_per_s"] == rows[1]["baseline_msgs_per_s"]


def test_the_c_application_is_refused_with_the_reason_when_it_cannot_be_built(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bench, "CONTRIB_DIRS", [tmp_path])
    assert bench.loopback_apps(None) == ("python",)  # the default falls back, and the run says why
    with pytest.raises(Lu2kError, match="--app c: no shim_stream.c in"):
        bench.loopback_apps("c")
    assert bench.loopback_apps("python") == ("python",)


@pytest.mark.parametrize("sizes, count, window", [([0], None, 512), ([64], 0, 512), ([64], None, 0)])
def test_bad_sizes_counts_and_windows_are_named(sizes: list[int], count: int | None, window: int) -> None:
    args = argparse.Namespace(sizes=sizes, count=count, window=window, encryption="aes-256-gcm", app="python", json=False)
    with pytest.raises(Lu2kError, match="must be at least 1"):
        bench.cmd_loopback(args)


def test_the_c_sources_are_found_in_the_working_directory_of_an_installed_lu2k(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "contrib").mkdir()
    (tmp_path / "contrib" / "shim_stream.c").write_text("int main(void) { return 0; }\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "CONTRIB_DIRS", [tmp_path / "site-packages" / "contrib", Path("contrib")])
    assert bench._contrib() == Path("contrib")
