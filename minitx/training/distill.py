"""Knowledge distillation: train a smaller decoder (the student) to imitate a trained one (the teacher).

The student minimises a weighted sum of objectives, each computed by spec ops inside its
training graph (so backends, the executor's memory accounting and the gradient checks all apply):

* ``response`` — T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) of the next-token distributions at
  temperature T (op ``kl_div``; the T² keeps its gradient on the scale of the hard loss);
* ``ce`` — the usual hard-label cross-entropy on the true next tokens (mixed in with ``response``
  this is Hinton et al.'s recipe; alone it is plain training);
* ``feature`` — MSE between the residual stream after student layer s, mapped through a learned
  linear projection (student width → teacher width), and the residual stream after teacher layer t
  (op ``mse``). The projections train with the student and are not saved into it;
* ``attention`` — KL between the teacher's and the student's attention probabilities for the
  same layer pairs (ops ``attention_probs`` + ``prob_kl``), averaged over maps and query rows.
  With equal head counts maps are compared head by head; otherwise each side averages its heads
  in contiguous groups down to gcd(H_s, H_t) maps (4 vs 2 heads: teacher heads 0–1 and 2–3 face
  student heads 0 and 1; 4 vs 3 heads: one head-averaged map each).

The projections and their AdamW moments are part of the checkpoint (``aux.distill.proj.*``), with
what identifies the run — the teacher's fingerprint, the text's, the loss weights, temperature and
layer map — so that ``--resume`` continues bit for bit and refuses a run that differs.

Layer pairs (``--layer-map 0:1,1:3``: student layer 0 ↔ teacher layer 1, …) default to spacing
the student's layers evenly over the teacher's, last to last. The teacher runs forward only (no
gradients), once per micro-batch; its logits, hidden states and attention maps are fed to the
student's graph as inputs. :class:`Distillation` is the objective; everything else — settings,
data split, batches, AdamW, schedule, precision, recompute, clipping, accumulation, held-out
evaluation, checkpoints — is :func:`minitx.training.fit`'s, so a student trained with ``ce``
alone is exactly ``minitx train`` (the ``--baseline`` the report compares against).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .. import data, models
from ..errors import MinitxError
from ..executor import Executor
from ..generate import generate
from ..ir import Graph, Node, Value
from ..model import Model
from . import checkpoint as ckpt
from .evaluation import evaluate
from .loop import batch_feeds, fit
from .settings import TrainSettings, TrainState, fresh_model

LOSSES = ("response", "ce", "feature", "attention")
PROJ = "distill.proj"


# ------------------------------------------------------------------------------------ settings
@dataclass
class DistillSettings:
    losses: dict[str, float] = field(default_factory=lambda: {"response": 1.0})
    temperature: float = 2.0
    layer_map: list[tuple[int, int]] | None = None   # (student layer, teacher layer); None = spread evenly

    def check(self) -> None:
        if not self.losses:
            raise MinitxError("no loss selected: give at least one --loss NAME=WEIGHT")
        for name, w in self.losses.items():
            if name not in LOSSES:
                raise MinitxError(f"unknown loss {name!r} (choose from {', '.join(LOSSES)})")
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise MinitxError(f"--loss {name}: the weight must be a positive number, got {w!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise MinitxError(f"--temperature must be > 0, got {self.temperature}")
        if self.layer_map is not None and not self.uses_layers:
            raise MinitxError("--layer-map pairs layers for the feature and attention losses; select one of them")

    @property
    def uses_layers(self) -> bool:
        return "feature" in self.losses or "attention" in self.losses


def parse_losses(specs: Sequence[str], known: Sequence[str] = LOSSES, default: str = "response",
                 teacher: str = "") -> dict[str, float]:
    """``["response=1", "feature=0.5"]`` → {"response": 1.0, "feature": 0.5}; a bare name weighs 1.
    ``known`` and ``default`` are the losses of a kind of teacher (``teacher`` names it in errors):
    encoders and encoder–decoders have their own."""
    out: dict[str, float] = {}
    for s in specs:
        name, _, w = s.partition("=")
        name = name.strip()
        if name not in known:
            raise MinitxError(f"--loss {s}: unknown loss {name!r}{teacher} (choose from {', '.join(known)})")
        if name in out:
            raise MinitxError(f"--loss {name} is given twice")
        try:
            weight = float(w) if w.strip() else 1.0
        except ValueError:
            raise MinitxError(f"--loss {s}: the weight {w!r} is not a number") from None
        if not (math.isfinite(weight) and weight > 0):
            raise MinitxError(f"--loss {s}: the weight must be a positive number")
        out[name] = weight
    return out or {default: 1.0}


def parse_layer_map(spec: str) -> list[tuple[int, int]]:
    """``"0:1,1:3"`` → [(0, 1), (1, 3)] (student layer : teacher layer)."""
    pairs = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        s, sep, t = part.partition(":")
        if not sep or not s.isdigit() or not t.isdigit():
            raise MinitxError(f"--layer-map expects STUDENT:TEACHER layer pairs such as 0:1,1:3, got {part!r}")
        pairs.append((int(s), int(t)))
    if not pairs:
        raise MinitxError("--layer-map is empty")
    return pairs


def default_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Student layer i ↔ teacher layer round((i+1)·L_t/L_s) − 1: evenly spread, last to last."""
    return [(i, max(round((i + 1) * n_teacher / n_student) - 1, 0)) for i in range(n_student)]


def student_config(teacher: Model, user: dict[str, Any]) -> dict[str, Any]:
    """The student's full config: the user's fields over the teacher's (same arch) or over the
    arch's tiny preset with the teacher's vocabulary and context (another arch)."""
    if not isinstance(user, dict):
        raise MinitxError("--student-config must be a JSON object")
    arch = user.get("arch", teacher.config["arch"])
    if arch == teacher.config["arch"]:
        base = dict(teacher.config)
    else:
        base = {**models.preset(arch, "tiny"), "vocab_size": teacher.vocab_size, "n_ctx": teacher.n_ctx}
    try:
        cfg = models.complete_config({**base, **user, "arch": arch})
    except MinitxError as e:
        raise MinitxError(f"student {e}") from None
    if not models.is_decoder(cfg):
        raise MinitxError(f"the student must be a decoder (gpt2 or llama), not {arch}")
    if int(cfg["vocab_size"]) != teacher.vocab_size:
        raise MinitxError(f"student vocab_size {cfg['vocab_size']} differs from the teacher's {teacher.vocab_size}: "
                          "distillation compares next-token distributions over one vocabulary "
                          "(the teacher's tokenizer)")
    return cfg


# ------------------------------------------------------------------------------------- graphs
def _hidden(graph: Graph, layer: int) -> str:
    """The residual stream after block ``layer``."""
    name = f"layers.{layer}.res2"
    if name not in graph.producers():
        raise MinitxError(f"the graph has no value {name!r} (the hidden state after layer {layer})")
    return name


def _qk(graph: Graph, layer: int) -> tuple[str, str, dict[str, Any]]:
    """Query and key values of layer ``layer``'s attention node and its attributes."""
    try:
        n = graph.node(f"layers.{layer}.attn.sdpa")
    except KeyError:
        raise MinitxError(f"layer {layer} has no plain attention node to read attention maps from "
                          "(a rewritten teacher? distil from the original model file)") from None
    if n.op != "attention":
        raise MinitxError(f"layer {layer}'s attention is a {n.op!r} node: attention maps need the plain 'attention' op")
    return n.inputs[0], n.inputs[1], n.attrs


def _attn_node(name: str, q: str, k: str, attrs: dict[str, Any], n_maps: int) -> Node:
    a = {key: attrs[key] for key in ("n_heads", "n_kv_heads", "causal") if key in attrs}
    if attrs.get("scale") is not None:
        a["scale"] = attrs["scale"]
    return Node(name, "attention_probs", [q, k, "attention_mask"], [name], {**a, "n_maps": n_maps})


@dataclass
class Plan:
    """What the teacher must produce and how the student's loss graph reads it."""

    settings: DistillSettings
    pairs: list[tuple[int, int]]
    n_maps: int
    teacher_graph: Graph            # the teacher's graph, its outputs = what the student needs
    student_graph: Graph            # the student's training graph, scalar output "loss"
    feeds_from_teacher: dict[str, str]   # student input name -> teacher value name
    proj_shapes: dict[str, tuple[int, ...]]


def plan(teacher: Model, student: Model, s: DistillSettings, graph: Graph | None = None) -> Plan:
    """How ``student`` (its graph, or ``graph``: the student's rewritten for training) learns
    from ``teacher``: the teacher's outputs to compute and the student's loss graph."""
    s.check()
    if not teacher.is_decoder:
        raise MinitxError(f"the teacher must be a decoder (gpt2 or llama), not {teacher.config['arch']}")
    if student.vocab_size != teacher.vocab_size:
        raise MinitxError(f"student vocab_size {student.vocab_size} differs from the teacher's {teacher.vocab_size}")
    Ls, Lt = int(student.config["n_layers"]), int(teacher.config["n_layers"])
    pairs = list(s.layer_map) if s.layer_map is not None else default_layer_map(Ls, Lt)
    for a, b in pairs:
        if not 0 <= a < Ls:
            raise MinitxError(f"--layer-map {a}:{b}: student layer {a} is out of range (the student has {Ls} "
                              f"layer(s): 0 … {Ls - 1})")
        if not 0 <= b < Lt:
            raise MinitxError(f"--layer-map {a}:{b}: teacher layer {b} is out of range (the teacher has {Lt} "
                              f"layer(s): 0 … {Lt - 1})")
    Hs, Ht = int(student.config["n_heads"]), int(teacher.config["n_heads"])
    n_maps = math.gcd(Hs, Ht)
    Cs, Ct, V = int(student.config["d_model"]), int(teacher.config["d_model"]), teacher.vocab_size
    dtype = str(next(iter(student.params.values())).dtype)

    tg = teacher.graph.copy()
    t_out: list[str] = []
    sg = (graph or student.graph).copy()
    feeds: dict[str, str] = {}
    proj: dict[str, tuple[int, ...]] = {}
    terms: list[tuple[str, float]] = []
    w = s.losses

    def node(name: str, op: str, inputs: list[str], **attrs: Any) -> str:
        sg.nodes.append(Node(name, op, inputs, [name], attrs))
        return name

    def mean_of(name: str, parts: list[str]) -> str:
        acc = parts[0]
        for k, p in enumerate(parts[1:]):
            acc = node(f"{name}.sum{k}", "add", [acc, p])
        return node(name, "scale", [acc], factor=1.0 / len(parts))

    if "response" in w:
        sg.inputs.append(Value("teacher.logits", ("B", "T", V), dtype))
        feeds["teacher.logits"] = "logits"
        t_out.append("logits")
        terms.append((node("loss.response", "kl_div", ["logits", "teacher.logits"], temperature=float(s.temperature)),
                      w["response"]))
    if "ce" in w:
        sg.inputs.append(Value("targets", ("B", "T"), "int64"))
        terms.append((node("loss.ce", "cross_entropy", ["logits", "targets"], ignore_index=-100), w["ce"]))
    if "feature" in w:
        parts = []
        for k, (a, b) in enumerate(pairs):
            src = f"teacher.hidden.{k}"
            sg.inputs.append(Value(src, ("B", "T", Ct), dtype))
            feeds[src] = _hidden(tg, b)
            t_out.append(feeds[src])
            pw, pb = f"{PROJ}.{k}.weight", f"{PROJ}.{k}.bias"
            sg.params[pw], sg.params[pb] = Value(pw, (Cs, Ct), dtype), Value(pb, (Ct,), dtype)
            proj[pw], proj[pb] = (Cs, Ct), (Ct,)
            h = node(f"distill.feature.{k}.proj", "linear", [_hidden(sg, a), pw, pb])
            parts.append(node(f"distill.feature.{k}.mse", "mse", [h, src]))
        terms.append((mean_of("loss.feature", parts), w["feature"]))
    if "attention" in w:
        parts = []
        for k, (a, b) in enumerate(pairs):
            tq, tk, tattrs = _qk(tg, b)
            tname = f"distill.attn.{b}"
            if tname not in t_out:
                tg.nodes.append(_attn_node(tname, tq, tk, tattrs, n_maps))
                t_out.append(tname)
            src = f"teacher.attn.{k}"
            sg.inputs.append(Value(src, ("B", n_maps, "T", "T"), dtype))
            feeds[src] = tname
            sq, sk, sattrs = _qk(sg, a)
            sg.nodes.append(_attn_node(f"distill.attn.{k}", sq, sk, sattrs, n_maps))
            parts.append(node(f"distill.attention.{k}.kl", "prob_kl", [f"distill.attn.{k}", src]))
        terms.append((mean_of("loss.attention", parts), w["attention"]))

    scaled = [node(f"{name}.weighted", "scale", [name], factor=float(wt)) for name, wt in terms]
    total = scaled[0]
    for k, p in enumerate(scaled[1:]):
        total = node(f"loss.sum{k}", "add", [total, p])
    sg.nodes.append(Node("loss", "scale", [total], ["loss"], {"factor": 1.0}))   # the name train's tools expect
    sg.outputs = ["loss", *[name for name, _ in terms]]
    tg.outputs = list(dict.fromkeys(t_out))
    tg.validate()
    sg.validate()
    return Plan(s, pairs, n_maps, tg, sg, feeds, proj)


def init_projections(p: Plan, seed: int, dtype) -> dict[str, np.ndarray]:
    """N(0, 1/fan_in) weights, zero biases: the projection starts as a random, width-preserving map."""
    rng = np.random.default_rng([seed, 7])
    return {k: (np.zeros(shape) if len(shape) == 1 else rng.normal(0.0, 1.0 / math.sqrt(shape[0]), shape)).astype(dtype)
            for k, shape in p.proj_shapes.items()}


# ---------------------------------------------------------------------------- the objective
def run_identity(teacher: Model, ds: DistillSettings, p: Plan, teacher_file: str | None = None) -> dict[str, Any]:
    """What a resumed distillation must repeat besides the training settings (its text is checked too)."""
    return {"teacher": ckpt.model_identity(teacher, teacher_file),
            "--loss": ",".join(f"{k}={float(ds.losses[k])!r}" for k in LOSSES if k in ds.losses),
            "--temperature": float(ds.temperature),
            "--layer-map": ",".join(f"{a}:{b}" for a, b in p.pairs) if ds.uses_layers else None}


@dataclass
class Distillation:
    """The objective :func:`minitx.training.fit` minimises to distil ``teacher`` into the state's
    model; the feature projections train alongside as the state's ``aux``."""

    teacher: Model
    settings: DistillSettings
    teacher_file: str | None = None
    kind: str = "distill"
    _plan: Plan | None = field(default=None, repr=False)
    _student: Model | None = field(default=None, repr=False)
    _teacher_ex: Executor | None = field(default=None, repr=False)

    def prepare(self, st: TrainState, backends: Sequence[Any]) -> dict[str, Any]:
        self._student = st.model
        self._plan = p = plan(self.teacher, st.model, self.settings)
        s = st.settings
        if st.step == 0 and not st.aux:
            st.aux = init_projections(p, s.seed, np.float32)
            st.aux_opt = s.optimizer(st.aux)
        have = {k: tuple(a.shape) for k, a in st.aux.items()}
        if have != {k: tuple(v) for k, v in p.proj_shapes.items()}:
            raise MinitxError(f"{st.source or 'the resumed state'}: the checkpoint's feature projections "
                              f"{sorted(have) or '(none)'} do not fit this run's ({sorted(p.proj_shapes) or 'none'})")
        self._teacher_ex = Executor(p.teacher_graph, self.teacher.params, backends)
        return run_identity(self.teacher, self.settings, p, self.teacher_file)

    def context(self, model: Model) -> int:
        return min(model.n_ctx, self.teacher.n_ctx)

    def loss_graph(self, graph: Graph) -> Graph:
        return plan(self.teacher, self._student, self.settings, graph).student_graph

    def extra_feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return teacher_feeds(self._plan, self._teacher_ex, x)


def teacher_feeds(p: Plan, tex: Executor, x: np.ndarray) -> dict[str, np.ndarray]:
    """The teacher's forward pass on ``x`` (no gradients): the student graph's ``teacher.*`` inputs."""
    if not p.feeds_from_teacher:
        return {}
    out = tex.run(batch_feeds(tex.graph, x), outputs=p.teacher_graph.outputs)
    return {dst: out[src] for dst, src in p.feeds_from_teacher.items()}


def distill(st: TrainState, teacher: Model, ids: np.ndarray, ds: DistillSettings, *,
            backends: Sequence[str] = ("numpy",), checkpoint: str | None = None, teacher_file: str | None = None,
            log: Callable[[str], None] | None = None,
            progress: Callable[[dict[str, float]], None] | None = None) -> TrainState:
    """Train ``st.model`` (a fresh student, or a ``distill`` checkpoint made with the same teacher,
    text and objectives) up to ``st.settings.steps`` steps on ``ids`` against ``teacher``."""
    return fit(st, ids, Distillation(teacher, ds, teacher_file), backends=backends, checkpoint=checkpoint,
               log=log, progress=progress)


# ------------------------------------------------------------------------------------ report
def heldout(model: Model, val_ids: np.ndarray, seq_len: int, backends: Sequence[str] = ("numpy",)) -> dict[str, float]:
    """Loss and perplexity on the true next tokens of ``val_ids``: consecutive windows of ``seq_len``
    (the same windows for every model compared, whatever its own context length); NaN without text."""
    if len(val_ids) < 2:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0}
    return evaluate(model, val_ids, seq_len=seq_len, backends=backends)


def decode_speed(model: Model, prompt: Sequence[int], n_tokens: int, backends: Sequence[str] = ("numpy",)) -> float:
    """Greedy decoding speed with the KV cache, tokens per second (after one warm-up step)."""
    if n_tokens <= 0:
        return float("nan")
    prompt = list(prompt)[: max(model.n_ctx - n_tokens, 1)]
    generate(model, [prompt], 2, backends=backends)
    t0 = time.perf_counter()
    out = generate(model, [prompt], n_tokens, backends=backends)
    return len(out[0]) / max(time.perf_counter() - t0, 1e-9)


def describe(name: str, model: Model, path: str | None, val_ids: np.ndarray, seq_len: int, prompt: Sequence[int],
             decode_tokens: int, backends: Sequence[str]) -> dict[str, Any]:
    """One row of the report; figures that could not be measured (no held-out text) are None."""
    ev = heldout(model, val_ids, seq_len, backends)

    def num(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {"model": name, "params": model.n_params(),
            "file_bytes": os.path.getsize(path) if path and os.path.exists(path) else None,
            "heldout_loss": num(ev["loss"]), "heldout_perplexity": num(ev["perplexity"]),
            "heldout_tokens": ev["tokens"],
            "decode_tokens_per_s": num(decode_speed(model, prompt, decode_tokens, backends))}


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The report as an aligned text table."""
    head = ["model", "params", "file size", "held-out loss", "perplexity", "decode tok/s"]

    def size(b):
        return "-" if b is None else f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"

    def fmt_num(x, spec):
        return "-" if x is None else format(x, spec)

    body = [[r["model"], f"{r['params']:,}", size(r["file_bytes"]), fmt_num(r["heldout_loss"], ".4f"),
             fmt_num(r["heldout_perplexity"], ".2f"), fmt_num(r["decode_tokens_per_s"], ",.0f")] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


def new_student(config: dict[str, Any], teacher: Model, settings: TrainSettings) -> TrainState:
    """A freshly initialised student (same seeds as ``minitx train``) carrying the teacher's tokenizer."""
    return fresh_model(config, teacher.tokenizer_json, settings, kind="distill")


def objectives(teacher: Model, student: Model, proj: dict[str, np.ndarray], ds: DistillSettings,
               x: np.ndarray, y: np.ndarray, backends: Sequence[str] = ("numpy",)) -> dict[str, float]:
    """Each selected objective (and their weighted sum, ``loss``) on one batch, without training."""
    p = plan(teacher, student, ds)
    extra = teacher_feeds(p, Executor(p.teacher_graph, teacher.params, backends), x)
    out = Executor(p.student_graph, {**student.params, **proj}, backends).run(
        batch_feeds(p.student_graph, x, y, extra), outputs=p.student_graph.outputs)
    return {k: float(v) for k, v in out.items()}


def run_report(teacher: Model, teacher_path: str | None, st: TrainState, ids: np.ndarray, ds: DistillSettings,
               output: str, *, baseline: bool = False, decode_tokens: int = 32,
               backends: Sequence[str] = ("numpy",), checkpoint: str | None = None,
               log: Callable[[str], None] | None = None,
               progress: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Distil, save the student to ``output``, optionally train the baseline, and measure all three
    models on the same held-out tokens and the same machine."""
    import tempfile

    from .. import modelfile

    log = log or (lambda m: None)
    s = st.settings
    seq_len = s.seq_len or min(st.model.n_ctx, teacher.n_ctx)
    t0 = time.perf_counter()
    distill(st, teacher, ids, ds, backends=backends, checkpoint=checkpoint, teacher_file=teacher_path,
            log=log, progress=progress)
    elapsed = time.perf_counter() - t0
    p = plan(teacher, st.model, ds)
    st.model.meta = {"source": "minitx distill", "teacher": os.path.basename(teacher_path or "bundled default"),
                     "losses": ds.losses, "temperature": ds.temperature,
                     "layer_map": [list(x) for x in p.pairs] if ds.uses_layers else None,
                     "settings": asdict(s), "history": st.history}
    modelfile.save(st.model, output)
    _, val = data.split(ids, s.val_fraction, seq_len)
    prompt = (val if len(val) else ids)[:16].tolist()
    rows = [describe("teacher", teacher, teacher_path, val, seq_len, prompt, decode_tokens, backends),
            describe("student (distilled)", st.model, output, val, seq_len, prompt, decode_tokens, backends)]
    if baseline:
        log("baseline: the same student trained without the teacher")
        bst = fresh_model(dict(st.model.config), st.model.tokenizer_json,
                          TrainSettings.from_dict({**asdict(s), "seq_len": seq_len}))
        fit(bst, ids, backends=backends, log=log)
        bst.model.meta = {"source": "minitx distill --baseline"}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "baseline.npz")
            modelfile.save(bst.model, path)
            rows.append(describe("student (no teacher)", bst.model, path, val, seq_len, prompt, decode_tokens,
                                 backends))
    return {"teacher_file": teacher_path, "student_file": output, "losses": ds.losses,
            "temperature": ds.temperature, "layer_map": [list(x) for x in p.pairs] if ds.uses_layers else None,
            "attention_maps": p.n_maps if "attention" in ds.losses else None,
            "steps": st.step, "seq_len": seq_len, "distill_seconds": elapsed, "models": rows,
            "history": st.history}
