"""Benchmark of what a clinician feels (a benchmark, not a timed test).

    python -m core.bench [--json OUT] [--repeats N] [--data-root DIR] [--no-train] [--accuracy] [--alternatives]

After warm-up, median and p95 over repeated runs of: model load; chest X-ray preprocess + predict +
Grad-CAM; cardiac study predict + Grad-CAM; atrium segmentation of one 256x256x130 volume; batch
throughput; peak memory. Each figure is compared in the same run with a named plain baseline: the
same models without our inference optimisations (batch norm folded into convolutions, channels-last
memory, slice batch size 1 on CPU, and for the U-Nets bfloat16 where the CPU runs it natively), as a
ratio baseline / optimised.

Training throughput (images per second through one optimizer step of each task's model, at the
registry's batch size and training input size, on random tensors) is compared with float32 and the
default memory layout; ``--no-train`` skips it.

``--accuracy`` also measures what the inference precision changes (core.precision): every case of the
data root through the models in float32 and in the precision the app uses, for the tasks where those
differ, with the validation figures of both. ``--alternatives`` times other runtimes on the atrium
U-Net (TorchScript, torch.compile, ONNX Runtime when installed) against the eager model the app uses.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from core import io as mio
from core.config import data_root
from core.errors import InvalidInputError
from core.atrium import segment_atrium
from core.cardiac import cardiac_cycle, predict_cardiac
from core.inference import load_model
from core.precision import cpu_description, flush_subnormals
from core.pneumonia import predict_xray, predict_xray_batch
from core.runtime import LoadedModel

BASELINE = ("same weights in float32 without conv-BN folding and channels-last (and without bfloat16 for the "
            "U-Nets); atrium slices in batches of 8")
TRAIN_BASELINE = "float32, default (contiguous) memory layout, same model, batch and input size"


def _train_inputs() -> dict[str, tuple]:
    """Per task: (model, input batch, target batch, loss) at the registry's training sizes."""
    from core.models import build_model
    from core.tasks import get_task
    from core.train import task_config

    out = {}
    for task in ("pneumonia", "cardiac", "atrium"):
        spec, cfg = get_task(task), task_config(task)
        g = torch.Generator().manual_seed(0)
        model = build_model(spec.architecture, **spec.model_kwargs)
        n = cfg.batch_size
        if task == "pneumonia":
            s = spec.input_spec["size"]
            x, y = torch.randn(n, 1, s, s, generator=g), torch.randint(0, 2, (n, 1), generator=g).float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits
        elif task == "cardiac":  # stage 1: the U-Net on single slices
            s = spec.input_spec["size"]
            model = model.unet
            x, y = torch.randn(n, 1, s, s, generator=g), torch.randint(0, 4, (n, s, s), generator=g)
            loss = torch.nn.functional.cross_entropy
        else:
            s = cfg.crop or 256
            x = torch.randn(n, spec.model_kwargs["in_channels"], s, s, generator=g)
            y = torch.randint(0, 2, (n, 1, s, s), generator=g).float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits
        out[task] = (model, x, y, loss)
    return out


def train_throughput(repeats: int = 6) -> dict:
    """Images per second through forward + backward + Adam step, optimised (bf16 autocast where
    native, channels-last: what ``core.train.fit`` does) against ``TRAIN_BASELINE``."""
    import copy

    from core.precision import autocast_for

    dev = torch.device("cpu")
    res = {}
    for task, (model, x, y, loss_fn) in _train_inputs().items():
        row = {"batch": int(x.shape[0]), "input": list(x.shape[1:])}
        for variant in ("optimised", "baseline"):
            m = copy.deepcopy(model).train()
            xb = x
            if variant == "optimised":
                m, xb = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.Adam(m.parameters(), 1e-3)

            def one_step() -> None:
                opt.zero_grad(set_to_none=True)
                with autocast_for(dev, enabled=variant == "optimised"):
                    out = m(xb)
                loss_fn(out.float(), y).backward()
                opt.step()

            t = _timeit(one_step, repeats, warmup=2)
            row[variant] = {**t, "images_per_s": x.shape[0] / t["median_s"]}
        row["speedup"] = row["baseline"]["median_s"] / row["optimised"]["median_s"]
        res[task] = row
    return res


def _timeit(fn: Callable[[], object], repeats: int, warmup: int | None = None) -> dict:
    """Median and p95 of ``repeats`` timed calls after ``warmup`` untimed ones (default: 2, or fewer
    when fewer repeats are asked for, as in a smoke run)."""
    for _ in range(min(2, repeats) if warmup is None else warmup):
        fn()
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return {"median_s": float(np.median(t)), "p95_s": float(np.percentile(t, 95)), "n": repeats}


def _inputs(root: Path) -> dict:
    """Real inputs from the data root when present, else synthetic ones of the same shapes."""
    rng = np.random.default_rng(0)
    out: dict = {"source": {}}
    xr = root / "chest_xray" / "train" / "PNEUMONIA" / "person996_bacteria_2924.jpeg"
    if xr.is_file():
        out["xray"] = mio.read_image_2d(xr.read_bytes())
        out["source"]["xray"] = str(xr.relative_to(root))
        out["xray_batch"] = [mio.read_image_2d(c.path.read_bytes()).pixels for c in mio.find_xray_cases(root)[:64]]
    else:
        out["xray"] = mio.Image2D(rng.random((224, 224)).astype(np.float32), "png")
        out["source"]["xray"] = "synthetic 224x224"
        out["xray_batch"] = [rng.random((224, 224)).astype(np.float32) for _ in range(64)]
    p = root / "ACDC" / "training" / "patient006"
    if p.is_dir():
        out["ed"] = mio.load_nifti_path(p / "patient006_frame01.nii.gz")
        out["es"] = mio.load_nifti_path(p / "patient006_frame02.nii.gz")
        out["source"]["cardiac"] = "ACDC patient006"
    else:
        v = rng.random((216, 256, 10)).astype(np.float32)
        out["ed"] = out["es"] = mio.Volume(v, np.eye(4), (1.0, 1.0, 1.0))
        out["source"]["cardiac"] = "synthetic 216x256x10"
    la = root / "Task02_Heart" / "imagesTr" / "la_003.nii.gz"
    if la.is_file() and mio.load_nifti_path(la).data.shape == (256, 256, 130):
        out["volume"] = mio.load_nifti_path(la)
        out["source"]["atrium"] = "MSD la_003 (256x256x130)"
    else:
        out["volume"] = mio.Volume(rng.random((256, 256, 130)).astype(np.float32), np.diag([1.25, 1.25, 1.37, 1]),
                                   (1.25, 1.25, 1.37))
        out["source"]["atrium"] = "synthetic 256x256x130"
    return out


def precision_check(root: Path) -> dict:
    """Per task whose app precision is not float32: the outputs of every case in both precisions
    (cardiac: probabilities, decisions at the card's threshold; atrium: agreement of the masks), and the
    validation figures of the card's held-out cases in each."""
    from core import metrics as M
    from core.checkpoint import read_card
    from core.evaluate import evaluate

    out: dict = {}
    for task in ("pneumonia", "cardiac", "atrium"):
        app = load_model(task).precision
        if app == "float32":
            out[task] = {"app_precision": app, "note": "float32 in the app: nothing changes"}
            continue
        val = set(read_card(task)["data"]["val_cases"])
        row: dict = {"app_precision": app, "compared_with": "float32"}
        if task == "cardiac":
            ev = {p: evaluate(task, root, precision=p) for p in ("float32", app)}
            pa, pb = (ev[p]["per_case"] for p in ("float32", app))
            thr = load_model(task).threshold
            dp = [abs(pa[k]["probability"] - pb[k]["probability"]) for k in pa]
            row.update({"n_cases": len(pa), "probability_max_abs_change": max(dp),
                        "probability_mean_abs_change": float(np.mean(dp)),
                        "decisions_changed": sum((pa[k]["probability"] >= thr) != (pb[k]["probability"] >= thr)
                                                 for k in pa)})
            label = {c.patient_id: c.label for c in mio.find_cardiac_cases(root)}
            for p in ("float32", app):
                ys = [label[k] for k in val]
                ps = [ev[p]["per_case"][k]["probability"] for k in val]
                m = M.classification_metrics(ys, ps, thr)
                est = [ev[p]["per_case"][k]["shape_estimate"]["lv_ef"] for k in val]
                ref = [ev[p]["per_case"][k]["shape_expert_masks_all_slices"]["lv_ef"] for k in val]
                row[f"validation_{p}"] = {"n": len(val), "auc": m["auc"], "accuracy": m["accuracy"],
                                          "lv_ef_mae": M.agreement(est, ref)["mae"]}
        else:
            lm = {p: load_model(task, precision=p) for p in ("float32", app)}
            agree, dice_gt = [], {p: [] for p in lm}
            for c in mio.find_atrium_cases(root):
                vol = mio.load_nifti_path(c.image_path)
                masks = {p: segment_atrium(m, vol).mask for p, m in lm.items()}
                agree.append(M.dice(masks[app], masks["float32"]))
                if c.case_id in val:
                    gt = mio.read_mask(c.label_path.read_bytes(), vol, c.label_path.name)
                    for p in lm:
                        dice_gt[p].append(M.dice(masks[p], gt))
            row.update({"n_cases": len(agree), "mask_dice_vs_float32_min": min(agree),
                        "mask_dice_vs_float32_mean": float(np.mean(agree))})
            for p in lm:  # none for a model trained on every volume: nothing held out to score
                if dice_gt[p]:
                    row[f"validation_{p}"] = {"n": len(dice_gt[p]), "dice_mean": float(np.mean(dice_gt[p]))}
        out[task] = row
    return out


def alternatives(volume: mio.Volume, repeats: int = 3, train_step: bool = True) -> dict:
    """Other runtimes on the atrium U-Net (BN folded, channels-last), each timed over every 2.5D slice of
    ``volume`` one at a time after warm-up, with the largest change of a probability against eager
    float32; and (``train_step``) one training step (batch 16 of whole 256x256 slices, bfloat16 autocast
    where native) eager against torch.compile. Compilation time is reported, not counted in the medians."""
    import io

    from core import preprocess as pp
    from core.precision import autocast, autocast_for
    from core.train import soft_dice_loss

    lm = load_model("atrium", precision="float32")
    m = lm.model
    padded, _ = pp.atrium_padded(volume.data, volume.spacing, lm.grid_mm)
    x = torch.cat([pp.atrium_window(padded, i, i + 1) for i in range(volume.data.shape[2])])
    out: dict = {"what": f"atrium U-Net over {len(x)} slices of {tuple(x.shape[1:])}, batch 1", "inference": {}}

    def over_slices(f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return torch.cat([torch.sigmoid(f(x[i : i + 1]).float()) for i in range(len(x))])

    def bf16(t: torch.Tensor) -> torch.Tensor:
        with autocast("bfloat16"):
            return m(t)

    runtimes: dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]] = {
        "eager_float32": lambda: m,
        "eager_bfloat16_autocast": lambda: bf16,
        "torchscript_trace_freeze_float32": lambda: torch.jit.freeze(torch.jit.trace(m, x[:1])),
        "torch_compile_float32": lambda: torch.compile(m),
    }
    q8 = load_model("atrium", precision="int8")  # the app's int8 model, where the weights carry its ranges
    if q8.precision == "int8":
        runtimes["eager_int8"] = lambda: q8.model
    else:
        out["inference"]["eager_int8"] = {"skipped": "no int8 activation ranges for these weights (or no quantised "
                                                     "kernels in this torch): python -m core.atrium int8"}
    try:
        import onnxruntime as ort

        def onnx_session() -> Callable[[torch.Tensor], torch.Tensor]:
            buf = io.BytesIO()  # in memory: the benchmark writes nothing but its JSON
            torch.onnx.export(m, (x[:1].contiguous(),), buf, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = torch.get_num_threads(), 1
            sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
            return lambda t: torch.from_numpy(sess.run(None, {"x": t.contiguous().numpy()})[0])

        runtimes["onnxruntime_float32"] = onnx_session
    except ImportError:
        out["inference"]["onnxruntime_float32"] = {"skipped": "onnxruntime is not installed (pip install onnxruntime onnx)"}
    ref = None
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's and exporters' deprecation and tracing notices
        for name, make in runtimes.items():
            t0 = time.perf_counter()
            try:
                f = make()
                prob = over_slices(f)  # also the warm-up (and compilation)
            except Exception as exc:  # an optional runtime that fails here is reported, not fatal
                out["inference"][name] = {"failed": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            setup = time.perf_counter() - t0
            ref = prob if ref is None else ref
            out["inference"][name] = {**_timeit(lambda: over_slices(f), repeats, warmup=0),
                                      "setup_and_first_pass_s": setup,
                                      "max_abs_prob_diff_vs_eager_float32": float((prob - ref).abs().max())}
    base = out["inference"]["eager_float32"]["median_s"]
    for r in out["inference"].values():
        if "median_s" in r:
            r["speedup_vs_eager_float32"] = base / r["median_s"]

    if not train_step:
        return out
    from core.models import build_model
    from core.tasks import get_task

    spec = get_task("atrium")
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(16, spec.model_kwargs["in_channels"], 256, 256, generator=g).contiguous(memory_format=torch.channels_last)
    yb = (torch.rand(16, 256, 256, generator=g) > 0.9).float()
    out["training_step"] = {"what": "one Adam step of the atrium U-Net, batch 16 x 3x256x256, channels-last, "
                                    "bfloat16 autocast where native"}
    for name in ("eager", "torch_compile"):
        net = build_model(spec.architecture, **spec.model_kwargs).to(memory_format=torch.channels_last)
        fwd = torch.compile(net) if name == "torch_compile" else net
        opt = torch.optim.Adam(net.parameters(), 1e-3)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast_for(torch.device("cpu")):
                lg = fwd(xb)[:, 0].float()
            (torch.nn.functional.binary_cross_entropy_with_logits(lg, yb) + soft_dice_loss(lg, yb)).backward()
            opt.step()

        t0 = time.perf_counter()
        step()
        out["training_step"][name] = {**_timeit(step, max(4, repeats), warmup=1),
                                      "first_step_s": time.perf_counter() - t0}
    tr = out["training_step"]
    tr["torch_compile"]["speedup_vs_eager"] = tr["eager"]["median_s"] / tr["torch_compile"]["median_s"]
    return out


def run(repeats: int = 10, root=None, train: bool = True, accuracy: bool = False, alt: bool = False) -> dict:
    """Every figure of the benchmark (see the module's docstring) as a dict."""
    # as the app does (core.precision.flush_subnormals): every float32 figure (the baseline, the precision check)
    # then measures the model rather than a CPU's slow path for subnormal numbers (a float32 U-Net pass took
    # 10.2 s on noise and 25 s on a real LGE volume, against 1.6 s flushed, on one 2-core CPU of this project)
    flush = flush_subnormals()
    try:
        root = data_root(root)
        res = _run(repeats, root, _inputs(root), train, accuracy, alt)
    finally:
        torch.set_flush_denormal(False)
    res["flush_denormal"] = bool(flush)
    return res


def _run(repeats: int, root, inp: dict, train: bool, accuracy: bool, alt: bool) -> dict:
    res: dict = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu": cpu_description(),
        "python": platform.python_version(),
        "baseline": BASELINE, "inputs": inp["source"], "figures": {},
    }
    opt = {t: load_model(t) for t in ("pneumonia", "cardiac", "atrium")}
    base = {t: load_model(t, optimize=False) for t in ("pneumonia", "cardiac", "atrium")}
    figs = res["figures"]

    def pair(name: str, f_opt: Callable, f_base: Callable, reps: int) -> None:
        o, b = _timeit(f_opt, reps), _timeit(f_base, reps)
        figs[name] = {"optimised": o, "baseline": b, "speedup": b["median_s"] / o["median_s"]}

    pair("model_load_all_three", lambda: [load_model(t) for t in opt],
         lambda: [load_model(t, optimize=False) for t in opt], repeats)
    pair("xray_predict_gradcam", lambda: predict_xray(opt["pneumonia"], inp["xray"]),
         lambda: predict_xray(base["pneumonia"], inp["xray"]), repeats)
    pair("cardiac_predict_gradcam", lambda: predict_cardiac(opt["cardiac"], inp["ed"], inp["es"]),
         lambda: predict_cardiac(base["cardiac"], inp["ed"], inp["es"]), repeats)
    # a 4D cine of 30 frames (ED blended into ES and back): every frame segmented, ED/ES picked, diagnosed
    t30 = np.cos(np.linspace(0, 2 * np.pi, 30, endpoint=False)) * 0.5 + 0.5
    cine = mio.Cine(np.stack([w * inp["ed"].data + (1 - w) * inp["es"].data for w in t30], axis=3).astype(np.float32),
                    inp["ed"].affine, inp["ed"].spacing, "bench cine")

    def cine_study(lm_: LoadedModel) -> None:
        try:
            cyc = cardiac_cycle(lm_, cine)
        except InvalidInputError:  # synthetic noise has no ventricle: every frame was segmented all the same
            return
        predict_cardiac(lm_, cine.frame(cyc.ed), cine.frame(cyc.es))

    pair("cardiac_cine_30_frames", lambda: cine_study(opt["cardiac"]), lambda: cine_study(base["cardiac"]),
         max(1, repeats // 3))
    r_at = max(1, repeats // 3)  # 3 at the default 10 repeats
    pair("atrium_volume_256x256x130", lambda: segment_atrium(opt["atrium"], inp["volume"]),
         lambda: segment_atrium(base["atrium"], inp["volume"], batch_size=8), r_at)
    pair("xray_batch_64", lambda: predict_xray_batch(opt["pneumonia"], inp["xray_batch"]),
         lambda: predict_xray_batch(base["pneumonia"], inp["xray_batch"]), max(1, repeats // 3))
    n = len(inp["xray_batch"])
    figs["xray_batch_64"]["images_per_s"] = n / figs["xray_batch_64"]["optimised"]["median_s"]
    figs["xray_batch_64"]["images_per_s_baseline"] = n / figs["xray_batch_64"]["baseline"]["median_s"]
    z = inp["volume"].data.shape[2]
    figs["atrium_volume_256x256x130"]["slices_per_s"] = z / figs["atrium_volume_256x256x130"]["optimised"]["median_s"]
    # accuracy check of the optimisation: same outputs on the same inputs
    po = predict_xray(opt["pneumonia"], inp["xray"]).probability
    pb = predict_xray(base["pneumonia"], inp["xray"]).probability
    mo = segment_atrium(opt["atrium"], inp["volume"]).mask
    mb = segment_atrium(base["atrium"], inp["volume"]).mask
    res["optimisation_output_change"] = {
        "xray_probability_abs_diff": abs(po - pb) if po is not None and pb is not None else None,
        "atrium_mask_voxels_differing": int((mo != mb).sum()), "atrium_mask_voxels": int(mb.sum()),
    }
    res["precision"] = {t: m.precision for t, m in opt.items()}
    res["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if train:
        from core.train import precision_label, task_config

        res["training"] = {"baseline": TRAIN_BASELINE,
                           "optimised": precision_label(torch.device("cpu"), task_config("atrium")),
                           "throughput": train_throughput(max(4, repeats // 2))}
    if accuracy:
        res["precision_check"] = precision_check(root)
    if alt:
        res["alternatives"] = alternatives(inp["volume"])
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--no-train", action="store_true", help="skip the training-throughput figures")
    ap.add_argument("--accuracy", action="store_true",
                    help="also compare every case's outputs in float32 and in the app's precision (needs the data)")
    ap.add_argument("--alternatives", action="store_true",
                    help="also time TorchScript, torch.compile and ONNX Runtime (if installed) on the atrium U-Net")
    args = ap.parse_args(argv)
    res = run(args.repeats, args.data_root, train=not args.no_train, accuracy=args.accuracy, alt=args.alternatives)
    print(f"torch {res['torch']} | {res['threads']} threads | device {res['device']} | baseline: {res['baseline']}")
    for name, f in res["figures"].items():
        print(f"{name:28s} median {f['optimised']['median_s']:.3f} s  p95 {f['optimised']['p95_s']:.3f} s  "
              f"baseline {f['baseline']['median_s']:.3f} s  speed-up x{f['speedup']:.2f}")
    print(f"precision {res['precision']}; peak memory {res['peak_memory_mb']:.0f} MB; "
          f"output change {res['optimisation_output_change']}")
    if "training" in res:
        print(f"training ({res['training']['optimised']}) vs baseline ({res['training']['baseline']}):")
        for task, r in res["training"]["throughput"].items():
            print(f"  {task:10s} batch {r['batch']} x {r['input']}: {r['optimised']['images_per_s']:.1f} img/s, "
                  f"baseline {r['baseline']['images_per_s']:.1f} img/s, speed-up x{r['speedup']:.2f}")
    for name, r in res.get("alternatives", {}).get("inference", {}).items():
        print(f"alternative {name:34s} {json.dumps(r)}")
    if "alternatives" in res:
        print(f"training step eager vs torch.compile: {json.dumps(res['alternatives']['training_step'])}")
    for task, r in res.get("precision_check", {}).items():
        print(f"precision check {task}: {json.dumps(r)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
