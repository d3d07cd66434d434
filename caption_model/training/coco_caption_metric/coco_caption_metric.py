"""COCO-caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) from pycocoevalcap, as an `evaluate` module.

    import evaluate
    metric = evaluate.load("caption_model/training/coco_caption_metric")     # a local folder: works offline
    metric.compute(predictions=["a dog runs"], references=[["a dog is running", "a brown dog runs"]])
    # {"Bleu_1": ..., "Bleu_2": ..., "Bleu_3": ..., "Bleu_4": ..., "METEOR": ..., "ROUGE_L": ..., "CIDEr": ...}

Keys and numbers are those of pycocoevalcap's COCOEvalCap (its "CIDEr" is CIDEr-D), so they compare with published
results. Captions are tokenised with the Stanford PTBTokenizer (Java) like COCOEvalCap. Without `java` on PATH
the tokenisation falls back to a Python approximation and METEOR (also Java) is skipped, with a warning.
Pass references as the dataset wrote them (the protocol tokenises them itself), not cleaned copies.

One deliberate difference from COCOEvalCap: a line break inside a caption (\r, \v, \f, U+2028, U+2029, ... not
only \n) becomes a space. The PTBTokenizer reads one caption per line and ends a line at any of them, so
COCOEvalCap would silently score every later caption against the wrong image's references.

This file is self-contained on purpose: `evaluate.load` copies only this file into its module cache.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Hashable, Mapping, Sequence

import datasets
import evaluate

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
          Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""
_DESCRIPTION = "BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of the COCO-caption reference code (pycocoevalcap)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one generated caption per image.
    references: list of list of str, the reference captions of the same images (at least one each).
    use_java: None (default) uses Java when `java` is on PATH; False forces the Python fallback.
Returns:
    dict with Bleu_1, Bleu_2, Bleu_3, Bleu_4, METEOR (only with Java), ROUGE_L, CIDEr (CIDEr-D), as floats.
"""

# Tokens PTBTokenizer output that COCOEvalCap drops (copied from pycocoevalcap.tokenizer.ptbtokenizer).
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])
NO_JAVA_WARNING = ("java not found on PATH: captions are tokenised in Python instead of the PTBTokenizer and "
                   "METEOR is skipped; scores are close to, not identical with, published COCO-caption numbers")

Captions = Mapping[Hashable, Sequence[str]]


# ---------------------------------------------------------------------------------------------- tokenising


def java_available() -> bool:
    """True when a `java` executable is on PATH (PTBTokenizer and METEOR need it)."""
    return shutil.which("java") is not None


def one_line(text: str) -> str:
    """`text` with every line break Python knows (a superset of the PTBTokenizer's: \n, \r, \v, \f, U+001C..U+001E,
    U+0085, U+2028, U+2029) turned into a space, so that a caption stays one line of the tokenizer's input."""
    return " ".join(text.splitlines())


def ptb_tokenize(captions: Captions) -> dict[Hashable, list[str]]:
    """COCOEvalCap's tokenisation: Stanford PTBTokenizer (lowercased, one line per caption), punctuation dropped.
    Line breaks inside a caption become spaces (`one_line`); a tokenizer output that still does not have one line
    per caption is an error, never a silent shift of captions between images."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    keys = [k for k, caps in captions.items() for _ in caps]
    if not keys:
        return {k: [] for k in captions}
    sentences = "\n".join(one_line(c) for caps in captions.values() for c in caps)
    jar_dir = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
    with tempfile.TemporaryDirectory() as tmp:  # not the package folder, which may be read-only
        path = os.path.join(tmp, "captions.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(sentences)
        cmd = ["java", "-cp", ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR, "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", path]
        lines = subprocess.run(cmd, cwd=jar_dir, capture_output=True, check=True).stdout.decode().split("\n")
    if len(lines) != len(keys):
        raise RuntimeError(f"expected the PTBTokenizer to return one line per caption ({len(keys)}), got "
                           f"{len(lines)} lines; refusing to score captions against the wrong images")
    out: dict[Hashable, list[str]] = {k: [] for k in captions}
    for key, line in zip(keys, lines):
        out[key].append(" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS))
    return out


def python_tokenize(captions: Captions) -> dict[Hashable, list[str]]:
    """Close Python stand-in for `ptb_tokenize`: lowercase, split clitics ('s, n't) and punctuation, drop it."""

    def tokenize(text: str) -> str:
        text = re.sub(r"(\w)(n't)\b", r"\1 \2", one_line(text).lower())
        tokens = re.findall(r"n't|'\w+|\w+|[^\w\s]", text)
        return " ".join(t for t in tokens if t not in PUNCTUATIONS and re.search(r"\w", t))

    return {k: [tokenize(c) for c in caps] for k, caps in captions.items()}


# ------------------------------------------------------------------------------------------------- scoring


_METEOR = None  # one METEOR Java process per Python process: starting it costs ~10 s (paraphrase table)
_METEOR_LOCK = threading.Lock()


@atexit.register
def _close_meteor() -> None:
    """Stop the shared METEOR process and close its pipes (pycocoevalcap's __del__ leaves them open)."""
    global _METEOR
    with _METEOR_LOCK:
        meteor, _METEOR = _METEOR, None
    if meteor is not None:
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        for pipe in (meteor.meteor_p.stdin, meteor.meteor_p.stdout, meteor.meteor_p.stderr):
            pipe.close()


def _meteor_score(gts: dict, res: dict) -> float | None:
    """Corpus METEOR from a shared pycocoevalcap Meteor process; None (and a warning) when it fails."""
    global _METEOR
    from pycocoevalcap.meteor.meteor import Meteor

    with _METEOR_LOCK:
        try:
            if _METEOR is None:
                _METEOR = Meteor()
            return float(_METEOR.compute_score(gts, res)[0])
        except Exception as error:  # a broken Java/METEOR must not end a training run
            _METEOR = None
            warnings.warn(f"METEOR failed and is skipped: {error!r}")
            return None


def _check_inputs(predictions: Mapping, references: Captions) -> None:
    if not predictions:
        raise ValueError("expected at least one prediction, got none")
    if set(predictions) != set(references):
        missing, extra = set(predictions) - set(references), set(references) - set(predictions)
        raise ValueError(f"expected the same ids in predictions and references; ids without references: "
                         f"{sorted(map(str, missing))[:5]}, ids without a prediction: {sorted(map(str, extra))[:5]}")
    for key, pred in predictions.items():
        if not isinstance(pred, str):
            raise ValueError(f"expected one caption string per id, got {type(pred).__name__} for id {key!r}")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"expected a non-empty list of reference strings for id {key!r}, got {refs!r}")


def coco_caption_scores(predictions: Mapping[Hashable, str], references: Captions,
                        use_java: bool | None = None) -> dict[str, float]:
    """COCOEvalCap scores of `predictions` {id: caption} against `references` {id: [captions]}.

    Returns Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr (pycocoevalcap's Cider is CIDEr-D). use_java=None uses Java
    when it is on PATH; without it: Python tokenisation, no METEOR, and a warning.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_inputs(predictions, references)
    if use_java is None:
        use_java = java_available()
        if not use_java:
            warnings.warn(NO_JAVA_WARNING)
    tokenize = ptb_tokenize if use_java else python_tokenize
    gts = tokenize({k: list(references[k]) for k in predictions})
    res = tokenize({k: [predictions[k]] for k in predictions})

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n}": float(b) for n, b in enumerate(bleu, 1)}
    meteor = _meteor_score(gts, res) if use_java else None
    if meteor is not None:
        scores["METEOR"] = meteor
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


# ------------------------------------------------------------------------------------------ evaluate module


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoCaption(evaluate.Metric):
    """COCO-caption metrics; `compute(predictions=[str], references=[[str]], use_java=None)`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"])

    def _compute(self, predictions, references, use_java=None):
        return coco_caption_scores(dict(enumerate(predictions)), dict(enumerate(references)), use_java=use_java)
