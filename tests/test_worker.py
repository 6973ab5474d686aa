"""A site's long-lived ClientApp worker and the shortened waits of its SuperNode.

The worker's whole loop runs against real SuperNodes in ``tests/deploy``; here are the
parts that decide what it runs and how long Flower's processes wait.
"""

from __future__ import annotations

import functools
import io
import time
import types
import zipfile
from pathlib import Path
from typing import Any

import pytest
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run

from fedpeft.cli import main
from fedpeft.client.supernode import ShortSleeps, shorten_waits
from fedpeft.client.worker import CLIENTAPP_REF, check_bundle
from fedpeft.server.exchange import OBJECT_RETRY_S, shorten_object_retry
from fedpeft.testing import InProcessGrid

ROOT = Path(__file__).resolve().parents[1]


def _bundle(pyproject: str) -> Fab:
    """A Flower app bundle holding only ``pyproject.toml`` (all the worker reads)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pyproject.toml", pyproject)
    return Fab(hash_str="0" * 64, content=buffer.getvalue(), verifications={})


def test_the_fedpeft_bundle_is_served() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'clientapp = "{CLIENTAPP_REF}"' in pyproject
    check_bundle(Run.create_empty(7), _bundle(pyproject))


def test_a_bundle_naming_another_clientapp_is_refused() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    evil = pyproject.replace(f'clientapp = "{CLIENTAPP_REF}"', 'clientapp = "evil.app:app"')
    with pytest.raises(PermissionError, match=r"'evil\.app:app'.*runs only") as err:
        check_bundle(Run.create_empty(7), _bundle(evil))
    assert "--isolation subprocess" in str(err.value)  # the way to serve such a run


def test_an_unreadable_bundle_is_refused() -> None:
    fab = Fab(hash_str="0" * 64, content=b"not a zip archive", verifications={})
    with pytest.raises(PermissionError, match="unreadable bundle"):
        check_bundle(Run.create_empty(7), fab)


def _supernode_loop() -> types.ModuleType:
    """A stand-in for ``flwr.supernode.start_client_internal``: the two names swapped."""
    module = types.ModuleType("fake_loop")
    calls: list[dict[str, Any]] = []

    def pull_objects(ids: list[str], **kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        return {}

    module.time = time  # type: ignore[attr-defined]
    module.pull_objects = pull_objects  # type: ignore[attr-defined]
    module.calls = calls  # type: ignore[attr-defined]
    return module


def test_shortened_waits_cap_every_sleep_and_the_first_object_retry() -> None:
    module = _supernode_loop()
    shorten_waits(module, 0.05)
    assert isinstance(module.time, ShortSleeps)
    start = time.perf_counter()
    module.time.sleep(3)  # Flower's idle wait
    assert time.perf_counter() - start < 1.0
    assert module.time.monotonic() > 0  # everything else is the time module's
    module.pull_objects(["a"])
    assert module.calls == [{"initial_backoff": 0.025, "backoff_cap": 0.1}]


def test_shortened_waits_apply_to_this_flower_release(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as loop

    # monkeypatch restores both names after the test
    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    shorten_waits(loop, 0.1)
    assert isinstance(loop.time, ShortSleeps) and loop.time.cap == 0.1
    assert isinstance(loop.pull_objects, functools.partial)


def test_shortened_waits_refuse_a_changed_flower_or_a_bad_interval() -> None:
    with pytest.raises(RuntimeError, match="changed the SuperNode loop"):
        shorten_waits(types.ModuleType("moved"), 0.1)
    for bad in (0, -1, 5):
        with pytest.raises(ValueError, match=r"must be in \(0, 3\] seconds"):
            shorten_waits(_supernode_loop(), bad)


def test_object_retry_is_shortened_only_where_the_grid_pulls_objects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.superlink.grid import http_grid

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    grid = object.__new__(http_grid.HttpGrid)  # no connection: only its module matters
    assert shorten_object_retry(grid)
    assert http_grid.pull_objects.keywords["initial_backoff"] == OBJECT_RETRY_S
    assert shorten_object_retry(grid)  # idempotent: not a partial of a partial
    assert not isinstance(http_grid.pull_objects.func, functools.partial)
    in_memory = object.__new__(InProcessGrid)
    assert not shorten_object_retry(in_memory)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["worker", "--poll-interval", "0"], "--poll-interval 0.0 must be > 0"),
        (["supernode", "--poll-interval", "9", "--", "--insecure"], "must be in (0, 3]"),
    ],
)
def test_bad_poll_intervals_exit_2_naming_them(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err
