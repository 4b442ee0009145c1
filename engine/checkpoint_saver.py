"""When and on which thread checkpoints are written: synchronously, or in the background.

A save first copies this rank's owned regions to host memory at a step boundary (the only part
training waits for with ``checkpoint.async=true``); writing, fsync, the manifest, the rename, the
``latest`` update and rotation (`engine.checkpoint.write_checkpoint`) then run on a background
thread. The next save waits for the previous one, and so does a normal shutdown.

The background thread agrees with the other ranks (every rank's write status, the manifest
records) over its own gloo process group created at startup, never the groups training uses, so
its collectives cannot interleave with training's. Which rank writes which region is fixed by the
layout and computed on the main thread, at the first save.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch.distributed as dist

from engine import checkpoint as ckpt


class Checkpointer:
    def __init__(self, root: str | Path, *, keep_last: int = 0, async_save: bool = False,
                 protect: tuple[str, ...] = ()):
        """Collective when distributed (creates the save group): every rank calls it at startup."""
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self.protect = set(protect)  # never rotated out: the checkpoint this run resumed from
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() and dist.get_world_size() > 1 else None
        self._layout_key = None
        self._owned: list[int] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.failed = threading.Event()  # set by the background thread when its save failed

    def _owned_for(self, entries: list[ckpt.Entry]) -> list[int]:
        key = [(e.key, tuple(e.meta.offset), tuple(e.meta.shape)) for e in entries]
        if key != self._layout_key:  # the first save, or optimizer state appeared since
            self._owned = ckpt.owned_indices(entries, self.group)
            self._layout_key = key
        return self._owned

    def save(self, step: int, entries: list[ckpt.Entry], *, model_config: dict, layout: dict,
             train_state: dict) -> Path:
        """Collective. Synchronous: returns once the checkpoint is complete. Asynchronous: returns
        once the host copy is taken; `wait` reports how the write ended."""
        self.wait()
        items = ckpt.host_copy(entries, self._owned_for(entries), copy=self.async_save)
        kwargs = dict(model_config=model_config, layout=layout, train_state=train_state, keep_last=self.keep_last,
                      protect=tuple(self.protect), group=self.group)
        if not self.async_save:
            return ckpt.write_checkpoint(self.root, step, items, **kwargs)
        self._thread = threading.Thread(target=self._write, args=(step, items, kwargs), name=f"checkpoint-{step}",
                                        daemon=True)
        self._thread.start()
        return self.root / ckpt.step_dir_name(step)

    def _write(self, step, items, kwargs) -> None:
        try:
            ckpt.write_checkpoint(self.root, step, items, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by wait()
            self._error = e
            self.failed.set()

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the background save (if any) has finished; raise its error here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            self.failed.clear()
            raise error
