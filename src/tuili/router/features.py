"""What a request looks like, in numbers, without running any language model.

The router must add well under a millisecond per request, so features are plain string
counts and a handful of precompiled regular expressions over at most `SCAN_CHARS`
characters (the start and the end of the conversation: instructions tend to sit at the
start, the question at the end). Lengths use the whole text.

Every feature is a float; `FEATURE_NAMES` fixes their order, which the saved classifier
records, so a classifier file and this module must agree (checked at load).
English and Chinese markers are both counted; Chinese has no spaces, so a CJK character
counts as a word.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

SCAN_CHARS = 6000  # head + tail scanned by the regular expressions

FEATURE_NAMES: tuple[str, ...] = (
    "log_chars", "log_words", "log_lines", "cjk_share", "ascii_share", "log_turns", "has_system",
    "code_fence", "code_tokens", "code_request", "math_symbols", "latex", "equation", "math_words",
    "digit_share", "reasoning", "explicit_think", "constraints", "questions", "easy_markers",
    "brevity", "long_output_request", "log_max_tokens", "no_max_tokens",
)


def _rx(*parts: str) -> re.Pattern:
    return re.compile("|".join(parts), re.IGNORECASE)


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[A-Za-z0-9_]+")
_CODE_TOKENS = re.compile(
    r"\b(?:def|class|return|import|lambda|async|await|const|let|var|function|public|static|void|"
    r"struct|impl|fn|SELECT|INSERT|JOIN|WHERE|#include|template|typename|malloc|nullptr)\b|"
    r"[{};]\s*$|=>|->|::|\(\)|\w+\(\w*[,)]|==|!=|\+=|&&|\|\|", re.MULTILINE)
_CODE_REQUEST = _rx(
    r"\b(?:code|function|implement\w*|program|script|algorithm|refactor\w*|debug\w*|bug|compile\w*|regex|"
    r"sql|query|api|class|python|javascript|typescript|java|rust|golang|c\+\+|bash|shell|unit tests?|"
    r"complexity|data structure|thread-safe|concurren\w+|recursion|recursive)\b",
    r"代码|函数|实现|程序|算法|编程|调试|复杂度")
_MATH_SYMBOLS = re.compile(r"[+\-*/^=<>≤≥≠∑∫√π∞×÷]|\d\s*[+\-*/^]\s*\d")
_LATEX = re.compile(r"\\(?:frac|sum|int|sqrt|lim|prod|alpha|beta|theta|cdot|leq|geq|mathbb|binom|infty)|\$[^$]+\$")
_EQUATION = re.compile(r"\b[a-z]\s*(?:\^\s*\d+)?\s*[+\-*/]?\s*\d*\s*=\s*[-\d(a-z]|\bf\(x\)|\bdy/dx\b", re.IGNORECASE)
_MATH_WORDS = _rx(
    r"\b(?:integral|integrate|derivative|differentiat\w+|equations?|solve|matri(?:x|ces)|eigen\w*|probabilit\w+|"
    r"expected value|theorem|lemma|polynomial|prime|modulo|limit|converge\w*|series|vector|calculus|"
    r"combinatori\w+|permutations?|inequality|logarithm|geometry|triangle|sequence)\b",
    r"积分|导数|方程|矩阵|概率|定理|多项式|质数|素数|极限|收敛|数列|不等式|几何|三角形")
_REASONING = _rx(
    r"step[- ]by[- ]step", r"\b(?:prove|proof|why|explain|compare|contrast|analy[sz]e|analysis|evaluate|"
    r"derive|justify|trade-?offs?|pros and cons|implications?|design|architect\w*|critique|reason\w*|"
    r"optimi[sz]e|strategy|plan|walk me through|in depth|in detail|detailed|thorough\w*|comprehensive)\b",
    r"证明|为什么|分析|一步一步|逐步|比较|解释|推导|评估|优缺点|设计|论证|详细")
_EXPLICIT = _rx(r"think (?:step[- ]by[- ]step|carefully|hard|deeply|it through)", r"reason carefully",
                r"take your time", r"show (?:your|all) (?:work|steps|reasoning)", r"chain of thought",
                r"深入思考|仔细思考|一步一步地?思考|认真思考|展示推理过程")
_CONSTRAINTS = _rx(r"\b(?:must|at least|at most|without using|ensure|constraints?|edge cases?|"
                   r"requirements?|handle|O\(n|must not|exactly|only use|assume)\b",
                   r"必须|至少|至多|不能|不要使用|边界|要求|约束")
_EASY = _rx(r"^\s*(?:hi|hello|hey|thanks|thank you|good (?:morning|night|evening)|what'?s up)\b",
            r"\b(?:translate|synonym|spell|define|capital of|what time|how do you say|fun fact|joke|"
            r"recommend|suggest|name (?:a|one|three|some))\b",
            r"你好|谢谢|早上好|翻译|讲个笑话|推荐")
_BREVITY = _rx(r"\b(?:one word|one sentence|briefly|short answer|in short|quick(?:ly)?|tl;?dr|yes or no|"
               r"just the answer|only the answer|in a few words)\b", r"简短|一句话|简单地?说|只要答案")
_LONG_OUTPUT = _rx(r"\b(?:essay|report|\d{3,5}[- ]words?|full implementation|complete program|"
                   r"whole (?:module|program)|chapter|thesis|whitepaper|specification|comprehensive guide)\b",
                   r"论文|报告|\d{3,5}字|完整的?程序|详细的?指南")


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
    sn = max(len(scan), 1)
    cjk = len(_CJK.findall(scan))
    ascii_chars = sum(1 for ch in scan if ch < "\x80")
    words_scan = len(_WORD.findall(scan)) + cjk
    words = words_scan * (n / sn) if n > sn else words_scan
    digits = sum(1 for ch in scan if "0" <= ch <= "9")
    return [
        _log(n),
        _log(words),
        _log(text.count("\n")),
        cjk / sn,
        ascii_chars / sn,
        _log(conv.turns - 1),
        float(conv.has_system),
        float("```" in scan),
        _log(len(_CODE_TOKENS.findall(scan))),
        _log(len(_CODE_REQUEST.findall(scan))),
        _log(len(_MATH_SYMBOLS.findall(scan))),
        _log(len(_LATEX.findall(scan))),
        _log(len(_EQUATION.findall(scan))),
        _log(len(_MATH_WORDS.findall(scan))),
        digits / sn,
        _log(len(_REASONING.findall(scan))),
        float(bool(_EXPLICIT.search(scan))),
        _log(len(_CONSTRAINTS.findall(scan))),
        _log(scan.count("?") + scan.count("？")),
        _log(len(_EASY.findall(scan))),
        float(bool(_BREVITY.search(scan))),
        float(bool(_LONG_OUTPUT.search(scan))),
        _log(max_tokens or 0),
        float(max_tokens is None),
    ]


def features_of(prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
                max_tokens: int | None = None) -> list[float]:
    return extract(conversation(prompt, messages), max_tokens)
