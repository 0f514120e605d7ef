"""The mediapipe networks (BlazeFace full range, FaceMesh): what can be measured without TensorFlow.

mediapipe 0.10.21 runs them as TFLite models inside its own graph, with the XNNPACK delegate; its Python
``solutions`` API exposes neither the thread count nor the delegate (they sit in subgraphs that
``calculator_params`` cannot reach). So the rows are: the graph as the workers call it (``MediaPipeDetector``,
``MediaPipeMesh``: pre- and post-processing included), and the bare ``.tflite`` files from the wheel under LiteRT's
interpreter (the ``ai-edge-litert`` package, optional: ``pip install ai-edge-litert``) with XNNPACK on 1 and 2
threads and with the default delegates off, on 192 x 192 inputs cut from the people photos. Converting them to ONNX
needs tf2onnx, which needs TensorFlow (not a Gestalt dependency): not measured.
"""
from __future__ import annotations

import os
import statistics
import time

import cv2
import numpy as np

MODELS = {"BlazeFace full range": ("face_detection", "face_detection_full_range_sparse.tflite", -1.0),
          "FaceMesh 468": ("face_landmark", "face_landmark.tflite", 0.0)}


def _median_ms(call, rounds: int) -> float:
    call()
    call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def graph_rows(photos: list[np.ndarray], rounds: int) -> list[tuple[str, str, float]]:
    """(network, how, ms) through the workers' classes: per photo for BlazeFace, per face for FaceMesh."""
    from shared.ml.preprocess.detection import MediaPipeDetector
    from shared.ml.preprocess.landmarks import MediaPipeMesh

    detector, mesh = MediaPipeDetector(), MediaPipeMesh()
    try:
        boxes = [f[0].box if (f := detector.detect(p)) else None for p in photos]
        pairs = [(p, b) for p, b in zip(photos, boxes, strict=True) if b is not None]
        det = _median_ms(lambda: [detector.detect(p) for p, _ in pairs], rounds) / len(pairs)
        lm = _median_ms(lambda: [mesh.landmarks(p, b) for p, b in pairs], rounds) / len(pairs)
    finally:
        detector.close()
        mesh.close()
    return [("BlazeFace full range", "mediapipe graph, per photo", det),
            ("FaceMesh 468", "mediapipe graph, per face", lm)]


def _runner(it):
    it.allocate_tensors()
    index = it.get_input_details()[0]["index"]
    outputs = [d["index"] for d in it.get_output_details()]

    def run(x: np.ndarray) -> list[np.ndarray]:
        it.set_tensor(index, x[None])
        it.invoke()
        return [it.get_tensor(o).copy() for o in outputs]

    return run


def interpreter_rows(photos: list[np.ndarray], rounds: int) -> list[tuple[str, str, float, str]]:
    """(network, how, ms per call, accuracy against XNNPACK on 1 thread) of the bare TFLite files; [] without
    ai-edge-litert."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        print("ai-edge-litert is not installed (pip install ai-edge-litert): the bare TFLite rows are skipped")
        return []
    import mediapipe

    out = []
    configs = (("XNNPACK, 1 thread", 1, OpResolverType.AUTO), ("XNNPACK, 2 threads", 2, OpResolverType.AUTO),
               ("no delegate, 1 thread", 1, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
    for name, (folder, file, low) in MODELS.items():
        path = os.path.join(os.path.dirname(mediapipe.__file__), "modules", folder, file)
        inputs = [(cv2.resize(p, (192, 192), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0)
                  * (1.0 - low) + low for p in photos]
        runs = {how: _runner(Interpreter(model_path=path, num_threads=threads, experimental_op_resolver_type=resolver))
                for how, threads, resolver in configs}
        got = {how: [run(x) for x in inputs] for how, run in runs.items()}
        ref = got[configs[0][0]]
        # The configurations take turns each round, as in bench/runtimes.py.
        samples: dict[str, list[float]] = {how: [] for how in runs}
        for r in range(rounds):
            order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
            for how in order:
                start = time.perf_counter()
                for x in inputs:
                    runs[how](x)
                samples[how].append((time.perf_counter() - start) / len(inputs))
        for how in runs:
            diff = max(float(np.abs(a - b).max()) for r, g in zip(ref, got[how], strict=True)
                       for a, b in zip(r, g, strict=True))
            out.append((name, f"LiteRT interpreter, {how}", 1000 * statistics.median(samples[how]),
                        f"max abs diff {diff:.1e} vs XNNPACK 1 thread"))
    return out
