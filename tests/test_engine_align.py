"""Results stay attached to the image they belong to, whatever order calls finish in."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import pytest

from reflectionflow.components import ComponentError, Reflector, Verifier, build
from reflectionflow.engine import Components, Executor
from reflectionflow.io import load_png
from reflectionflow.world.evaluate import evaluate_image
from reflectionflow.world.spec import parse_prompt

from .test_engine_support import outputs, run, subset_file


class Jittery(Verifier, Reflector):
    """An API-style judge: each request is a call of random latency, finishing out of order. Like a
    correct client it returns results by request position (what the original's as_completed loop
    did not). Concurrent engine calls (workers > 1) also overlap here."""

    def __init__(self, inner, seed: int):
        self.inner = inner
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.finish_orders: list[list[int]] = []

    def _fan_out(self, n, one):
        with self.lock:
            delays = [self.rng.uniform(0, 0.004) for _ in range(n)]
        out, order = [None] * n, []
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = {pool.submit(lambda k: (time.sleep(delays[k]), one(k))[1], k): k for k in range(n)}
            for f in as_completed(futures):
                k = futures[f]
                order.append(k)
                out[k] = f.result()
        with self.lock:
            self.finish_orders.append(order)
        return out

    def score(self, images, prompts):
        return self._fan_out(len(images), lambda k: self.inner.score([images[k]], [prompts[k]])[0])

    def reflect(self, requests):
        return self._fan_out(len(requests), lambda k: self.inner.reflect([requests[k]])[0])


def _components(verifier, reflector):
    return Components(generator=build("generator", "world-render"), verifier=verifier, reflector=reflector,
                      refiner=build("refiner", "world-rule"), corrector=build("corrector", "world-edit"))


def test_out_of_order_results_stay_with_their_images(tmp_path):
    prompts = subset_file(tmp_path, 2)
    ref = tmp_path / "ref"
    run(ref, prompts, method="reflection", budget=8)
    jv = Jittery(build("verifier", "world-oracle"), 1)
    jr = Jittery(build("reflector", "world-oracle"), 2)
    out = tmp_path / "jittery"
    run(out, prompts, method="reflection", budget=8, batch_size=5, workers=4, components=_components(jv, jr))
    assert any(o != sorted(o) for o in jv.finish_orders)  # calls really did finish out of order
    assert outputs(out) == outputs(ref)
    # Every recorded verdict is the verdict of the image in its own file, against the original prompt.
    for i in range(12):
        meta = json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text())
        for line in (out / f"{i:05d}" / "trace.jsonl").read_text().splitlines():
            rec = json.loads(line)
            v = evaluate_image(load_png(out / f"{i:05d}" / rec["file"]), parse_prompt(meta["prompt"]))
            assert rec["score"] == v.score and rec["yes"] == v.correct


class Reversed(Verifier):
    """A component that loses track of order: results reversed within each call."""

    def __init__(self, inner):
        self.inner = inner

    def score(self, images, prompts):
        return self.inner.score(images, prompts)[::-1]


class Short(Verifier):
    def score(self, images, prompts):
        return build("verifier", "world-oracle").score(images[:-1], prompts[:-1])


def test_a_component_that_drops_results_is_an_error_not_a_shift(tmp_path):
    prompts = subset_file(tmp_path, 1)
    comps = _components(Short(), build("reflector", "world-oracle"))
    comps.names = {"verifier": "short"}
    with pytest.raises(ComponentError, match=r"verifier 'short' returned 5 results for 6 requests"):
        run(tmp_path / "x", prompts, method="noise", budget=1, components=comps)


def test_executor_reassembles_chunks_by_position_not_completion():
    seen = []

    def slow_first(chunk):
        time.sleep(0.02 if chunk[0] == 0 else 0.0)  # the first chunk finishes last
        seen.append(chunk[0])
        return [x * 10 for x in chunk]

    ex = Executor(_components(build("verifier", "world-oracle"), None), batch_size=2, workers=4)
    out, _ = ex.call("verifier", slow_first, list(range(9)), int)
    ex.close()
    assert seen[-1] == 0 and out == [x * 10 for x in range(9)]


def test_the_alignment_check_catches_a_component_that_reorders(tmp_path):
    # Control for the first test: had any score been attached to the wrong image, checking each
    # record against its own file would have shown it.
    prompts = subset_file(tmp_path, 1)
    out = tmp_path / "rev"
    run(out, prompts, method="noise", budget=4, components=_components(Reversed(build("verifier", "world-oracle")),
                                                                        None))
    mismatched = 0
    for i in range(6):
        meta = json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text())
        for line in (out / f"{i:05d}" / "trace.jsonl").read_text().splitlines():
            rec = json.loads(line)
            v = evaluate_image(load_png(out / f"{i:05d}" / rec["file"]), meta)
            mismatched += rec["score"] != v.score
    assert mismatched > 0
