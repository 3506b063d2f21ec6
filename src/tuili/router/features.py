"""What a request looks like, in numbers, without running any language model.

The router must add well under a millisecond per request, so features are counts made
at C speed: one regular-expression pass splits the lowercased text into words, a set
intersection finds the keywords among them, and phrases and Chinese markers (Chinese
has no spaces to split on) are counted with `str.count`, English phrases only when
their first word occurs. Only `SCAN_CHARS` characters are
scanned (the start and the end of the conversation: instructions tend to sit at the
start, the question at the end); lengths use the whole text. Many regexes, one per
feature, with IGNORECASE, measured 10-20x slower.

Every feature is a float; `FEATURE_NAMES` fixes their order, which the saved classifier
records, so a classifier file and this module must agree (checked at load).
English and Chinese markers are both counted; Chinese has no spaces, so a CJK character
counts as a word.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

SCAN_CHARS = 2000  # head + tail scanned for markers

FEATURE_NAMES: tuple[str, ...] = (
    "log_chars", "log_words", "log_lines", "cjk_share", "ascii_share", "log_turns", "has_system",
    "code_fence", "code_tokens", "code_request", "math_symbols", "latex", "equation", "math_words",
    "digit_share", "reasoning", "explicit_think", "constraints", "questions", "easy_markers",
    "brevity", "long_output_request", "log_max_tokens", "no_max_tokens",
)


def _words(*groups: str) -> frozenset[str]:
    return frozenset(w for g in groups for w in g.split())


# Single words, matched as whole lowercase words through one dict lookup per word.
_CODE_WORDS = _words("def class return import lambda async await const let var function public static void",
                     "struct impl fn select insert join where include template typename malloc nullptr")
_CODE_REQUEST_WORDS = _words(
    "code function functions implement implementing implementation program script algorithm refactor",
    "refactoring debug debugging bug bugs compile compiler regex sql query api python javascript typescript",
    "java rust golang c++ bash shell complexity recursion recursive concurrency concurrent thread-safe",
    "parser tokenizer schema endpoint")
_MATH_WORDS = _words(
    "integral integrate derivative differentiate equation equations solve matrix matrices eigenvalue",
    "eigenvalues eigenvector eigenvectors probability theorem lemma polynomial prime primes modulo limit",
    "converge converges convergence series vector calculus combinatorics permutation permutations",
    "inequality logarithm geometry triangle sequence irrational")
_REASONING_WORDS = _words(
    "prove proof why explain compare contrast analyze analyse analysis evaluate derive justify tradeoff",
    "tradeoffs trade-off trade-offs implications design architecture critique reason reasoning optimize",
    "optimise strategy plan detailed thorough thoroughly comprehensive")
_CONSTRAINT_WORDS = _words("must ensure constraint constraints requirement requirements handle exactly assume")
_EASY_WORDS = _words("hi hello hey thanks translate synonym spell define joke recommend suggest")
_LONG_OUTPUT_WORDS = _words("essay report chapter thesis whitepaper specification")
_WORD_FEATURE: dict[str, str] = {}
for _name, _set in (("code_tokens", _CODE_WORDS), ("code_request", _CODE_REQUEST_WORDS),
                    ("math_words", _MATH_WORDS), ("reasoning", _REASONING_WORDS),
                    ("constraints", _CONSTRAINT_WORDS), ("easy_markers", _EASY_WORDS),
                    ("long_output_request", _LONG_OUTPUT_WORDS)):
    for _w in _set:
        _WORD_FEATURE.setdefault(_w, _name)

# Phrases and Chinese markers, counted with str.count on the lowercased text (C speed).
_PHRASES: dict[str, tuple[str, ...]] = {
    "code_tokens": ("=>", "->", "::", "()", "==", "!=", "+=", "&&", "||", "#include", "};"),
    "code_request": ("unit test", "data structure", "代码", "函数", "实现", "程序", "算法", "编程", "调试", "复杂度"),
    "math_words": ("expected value", "积分", "导数", "方程", "矩阵", "概率", "定理", "多项式", "质数", "素数",
                   "极限", "收敛", "数列", "不等式", "几何", "三角形", "无理数"),
    "reasoning": ("step by step", "step-by-step", "pros and cons", "walk me through", "in depth", "in detail",
                  "证明", "为什么", "分析", "一步一步", "逐步", "比较", "解释", "推导", "评估", "优缺点", "设计",
                  "论证", "详细"),
    "constraints": ("at least", "at most", "without using", "edge case", "must not", "only use", "o(n", "o(1",
                    "必须", "至少", "至多", "不能", "不要使用", "边界", "要求", "约束"),
    "easy_markers": ("thank you", "good morning", "good night", "what time", "how do you say", "fun fact",
                     "capital of", "name a ", "name three", "你好", "谢谢", "早上好", "翻译", "笑话", "推荐"),
    "long_output_request": ("full implementation", "complete program", "comprehensive guide", "words", "论文",
                            "报告", "完整的程序", "指南"),
}
_EXPLICIT = ("think step by step", "think carefully", "think hard", "think deeply", "think it through",
             "reason carefully", "take your time", "show your work", "show all steps", "show your reasoning",
             "chain of thought", "深入思考", "仔细思考", "一步一步地思考", "一步一步思考", "认真思考", "展示推理过程")
_BREVITY = ("one word", "one sentence", "briefly", "short answer", "in short", "quick", "tl;dr", "tldr",
            "yes or no", "just the answer", "only the answer", "in a few words", "简短", "一句话", "简单说",
            "简单地说", "只要答案")
_LATEX = ("\\frac", "\\sum", "\\int", "\\sqrt", "\\lim", "\\prod", "\\alpha", "\\beta", "\\theta", "\\cdot",
          "\\leq", "\\geq", "\\mathbb", "\\binom", "\\infty", "$")
_MATH_SYMBOLS = "+-*/^=<>≤≥≠∑∫√π∞×÷"
_WORD = re.compile(r"\w[\w'+#-]*")
_DIGIT = re.compile(r"[0-9]")
_MATH_SYMBOL = re.compile("[" + re.escape(_MATH_SYMBOLS) + "]")
_ENGLISH_PHRASES = {name: tuple(p for p in ph if p.isascii()) for name, ph in _PHRASES.items()}
_CHINESE_PHRASES = {name: tuple(p for p in ph if not p.isascii()) for name, ph in _PHRASES.items()}


def _equations(low: str) -> int:
    """'=' with an operand on each side (x = 3, f(x)=2y), not '==', '=>', '+=' or '<='."""
    count, i = 0, low.find("=")
    while i != -1:
        before, after = low[max(0, i - 3): i].rstrip(), low[i + 1: i + 4].lstrip()
        if (before and after and (before[-1].isalnum() or before[-1] == ")")
                and (after[0].isalnum() or after[0] in "(-") and low[i + 1: i + 2] not in ("=", ">")):
            count += 1
        i = low.find("=", i + 1)
    return count


@dataclass
class Conversation:
    """The text the router looks at: the messages joined, plus the turn count."""

    text: str
    turns: int
    has_system: bool


def conversation(prompt: str | None = None, messages: list[dict[str, Any]] | None = None) -> Conversation:
    if messages is None:
        return Conversation(prompt or "", 1, False)
    texts: list[str] = []
    turns, has_system = 0, False
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        if isinstance(content, list):  # OpenAI content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        content = content or ""
        if role == "user":
            turns += 1
        elif role in ("system", "developer"):
            has_system = True
        texts.append(content)
    return Conversation("\n".join(texts), max(turns, 1), has_system)


def _log(n: float) -> float:
    return math.log1p(n)


def extract(conv: Conversation, max_tokens: int | None = None) -> list[float]:
    """The feature vector, in FEATURE_NAMES order."""
    text = conv.text
    n = len(text)
    scan = text if n <= SCAN_CHARS else text[: SCAN_CHARS // 2] + "\n" + text[-SCAN_CHARS // 2:]
    low = scan.lower()
    sn = max(len(scan), 1)
    if scan.isascii():
        wide, ascii_chars = 0, len(scan)
    else:
        ascii_chars = len(scan.encode("ascii", "ignore"))
        # Characters at U+0800 and above (CJK, kana, Hangul, ...) take 3 UTF-8 bytes, the
        # accented Latin/Greek/Cyrillic ones 2: count the first kind without a Python loop.
        wide = max(0, len(scan.encode("utf-8", "surrogatepass")) - ascii_chars - 2 * (len(scan) - ascii_chars))
    words = _WORD.findall(low)
    vocab = Counter(words)
    counts = dict.fromkeys(_PHRASES, 0)
    for w in vocab.keys() & _WORD_FEATURE.keys():
        counts[_WORD_FEATURE[w]] += vocab[w]
    chars = set(low)  # a phrase is only searched for when its first word or character occurs
    for name, phrases in _ENGLISH_PHRASES.items():
        counts[name] += sum(low.count(p) for p in phrases
                            if (p.split()[0] in vocab if p[0].isalpha() else p[0] in chars))
    if wide:
        for name, phrases in _CHINESE_PHRASES.items():
            counts[name] += sum(low.count(p) for p in phrases if p[0] in chars)
    n_words = len(words) + wide
    if n > len(scan):
        n_words = n_words * n / len(scan)
    digits = len(_DIGIT.findall(low))
    return [
        _log(n),
        _log(n_words),
        _log(text.count("\n")),
        wide / sn,
        ascii_chars / sn,
        _log(conv.turns - 1),
        float(conv.has_system),
        float("```" in scan),
        _log(counts["code_tokens"] + low.count(";\n") + low.count("{\n")),
        _log(counts["code_request"]),
        _log(len(_MATH_SYMBOL.findall(low))),
        _log(sum(low.count(p) for p in _LATEX) if "\\" in low or "$" in low else 0),
        _log(_equations(low) + low.count("f(x)") + low.count("dy/dx")),
        _log(counts["math_words"]),
        digits / sn,
        _log(counts["reasoning"]),
        float(any(p in low for p in _EXPLICIT if p[0] in chars)),
        _log(counts["constraints"]),
        _log(scan.count("?") + scan.count("？")),
        _log(counts["easy_markers"]),
        float(any(p in low for p in _BREVITY if p[0] in chars)),
        float(counts["long_output_request"] > 0),
        _log(max_tokens or 0),
        float(max_tokens is None),
    ]


def features_of(prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
                max_tokens: int | None = None) -> list[float]:
    return extract(conversation(prompt, messages), max_tokens)
