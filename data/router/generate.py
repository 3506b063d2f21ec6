"""Write tuili's own labelled router data set: data/router/train.jsonl and heldout.jsonl.

    python data/router/generate.py            # deterministic (seed 7): same files every run

Prompts come from hand-written templates filled with varied slots, across six
categories (chat, code, math, reasoning, writing, Chinese), each with easy and hard
forms. "hard" means: a small model would likely fail and a stronger one is worth the
wait (multi-step reasoning, proofs, non-trivial code, long structured writing, analysis
with trade-offs). "easy" means: chit-chat, facts, short rewrites, one-step arithmetic,
small code questions. Real traffic is messier, so some forms cut against the surface
cues on purpose: short hard prompts ("Prove that there are infinitely many primes."),
long easy ones (a pasted paragraph to fix typos in), multi-turn easy chats, and an
explicit `max_tokens` on some rows (small on most easy rows, large or absent on most
hard ones, with exceptions). The held-out split is a fixed 25% of each category.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

TOPICS = ["photosynthesis", "the French Revolution", "black holes", "inflation", "the immune system",
          "plate tectonics", "the Roman Empire", "machine learning", "climate change", "the stock market",
          "vaccines", "the water cycle", "quantum computing", "the printing press", "jazz music",
          "coral reefs", "the Silk Road", "electric cars", "sleep", "volcanoes"]
THINGS = ["a cat", "the ocean", "autumn", "a lighthouse", "coffee", "the moon", "a train station", "rain",
          "an old library", "a mountain village", "winter mornings", "a city at night"]
COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Canada", "Norway", "Egypt", "Vietnam", "Chile",
             "Australia", "Poland", "India"]
WORDS = ["happy", "fast", "important", "difficult", "beautiful", "tired", "smart", "quiet", "strange"]
LANGS = ["Python", "JavaScript", "Rust", "Go", "Java", "C++", "TypeScript", "C#"]
DS = ["an LRU cache", "a trie", "a min-heap", "a thread-safe queue", "a rate limiter", "an interval tree",
      "a consistent-hashing ring", "a skip list", "a bloom filter", "a union-find structure"]
FOODS = ["pasta", "a vegetarian curry", "pancakes", "a quick salad", "banana bread", "fried rice"]
CITIES = ["Paris", "Tokyo", "Lisbon", "Mexico City", "Seoul", "Istanbul", "Cape Town", "Prague"]
CN_TOPICS = ["人工智能", "气候变化", "中国古代历史", "量子计算", "城市化", "电动汽车", "教育改革",
             "远程办公", "人口老龄化", "社交媒体"]
CN_THINGS = ["春天", "月亮", "大海", "故乡", "秋天的落叶", "一只猫", "雨夜", "长城"]
PARAGRAPHS = [
    "Our team met on tuesday to discus the new schedule. Everyone agred that the deadline was to tight, "
    "so we decided to move the launch to next month. Sarah will send the updated plan to the the client "
    "by friday, and Tom will update the website.",
    "The museum is open from 9am to 5pm every day exept monday. Tickets can be bought online or at the "
    "entrance, children under 12 enter for free. Please note that photography with flash is not aloud in "
    "the main gallery.",
    "I wanted to let you know that the package arrived yesterday but the box was damaged and one of the "
    "cups was broken. Could you send a replacment or refund the cost of the broken item? I have attached "
    "pictures of the damage.",
]
CODE_SNIPPETS = [
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)",
    "const xs = [3, 1, 2];\nxs.sort();\nconsole.log(xs);",
    "SELECT name, COUNT(*) FROM orders GROUP BY name;",
]
BUGGY = [
    ("def average(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n",
     "it crashes sometimes in production"),
    ("def merge(intervals):\n    intervals.sort()\n    out = [intervals[0]]\n    for s, e in intervals[1:]:\n"
     "        if s < out[-1][1]:\n            out[-1][1] = e\n        else:\n            out.append([s, e])\n"
     "    return out\n", "the merged intervals are sometimes wrong"),
    ("async function fetchAll(urls) {\n  const results = [];\n  urls.forEach(async (u) => {\n"
     "    const r = await fetch(u);\n    results.push(await r.json());\n  });\n  return results;\n}\n",
     "it always returns an empty array"),
    ("class Counter:\n    count = 0\n    def incr(self):\n        self.count += 1\n\n# used from 8 threads\n",
     "the final count is lower than expected under load"),
]


def pick(rng: random.Random, xs):
    return xs[rng.randrange(len(xs))]


def chat(rng: random.Random):
    easy = [
        lambda: "Hi! How are you today?",
        lambda: f"What's the capital of {pick(rng, COUNTRIES)}?",
        lambda: f"Give me a synonym for '{pick(rng, WORDS)}'.",
        lambda: f"Tell me a fun fact about {pick(rng, TOPICS)}.",
        lambda: f"Can you recommend a good recipe for {pick(rng, FOODS)}?",
        lambda: f"How do you say 'thank you' in {pick(rng, ['Japanese', 'German', 'Portuguese', 'Korean', 'Swahili'])}?",
        lambda: "Tell me a joke about programmers.",
        lambda: f"What time zone is {pick(rng, CITIES)} in?",
        lambda: f"Thanks for the help earlier! One more: what is {pick(rng, TOPICS)} in one sentence?",
        lambda: f"Suggest three names for a {pick(rng, ['golden retriever', 'black cat', 'goldfish', 'parrot'])}.",
        lambda: "What's a good book to read on a rainy weekend?",
        lambda: f"Define {pick(rng, ['serendipity', 'ephemeral', 'ubiquitous', 'pragmatic', 'nostalgia'])}.",
        lambda: f"Briefly, what is {pick(rng, TOPICS)}?",
        lambda: f"Is {pick(rng, CITIES)} worth visiting in winter? Short answer please.",
        lambda: "Good morning! Any tips to stay focused while working from home?",
        lambda: f"Translate 'where is the train station' into {pick(rng, ['French', 'Spanish', 'Italian', 'Dutch'])}.",
    ]
    hard = [
        lambda: f"I'm deciding between a job offer in {pick(rng, CITIES)} with a higher salary and staying at my "
                f"current company where I'm up for promotion. Walk me through the trade-offs, including cost of "
                f"living, career growth and risk, and help me build a decision framework.",
        lambda: f"Explain in depth why {pick(rng, TOPICS)} matters, compare the main competing explanations, "
                f"and evaluate the evidence for each.",
        lambda: "My startup has 8 months of runway. Analyze whether we should cut staff, raise a bridge round, "
                "or pivot to enterprise customers. Consider the pros and cons of each and propose a plan.",
        lambda: f"Why do some economists argue that {pick(rng, ['minimum wage increases', 'rent control', 'tariffs', 'universal basic income'])} "
                f"helps while others argue it hurts? Analyze both sides with examples.",
        lambda: pick(rng, ["Why is the sky blue? Explain the physics.", "Why do we have seasons? Explain carefully.",
                           "Explain how public-key cryptography works, in depth.",
                           "Compare capitalism and socialism critically.", "Why did the Roman Empire fall? Analyze."]),
        lambda: "Design a 12-week training plan for a first marathon for someone who currently runs 10 km a "
                "week, and justify the progression.",
    ]
    return easy, hard


def code(rng: random.Random):
    lang = pick(rng, LANGS)
    easy = [
        lambda: f"How do I reverse a list in {lang}?",
        lambda: f"What does this print?\n```\n{pick(rng, CODE_SNIPPETS)}\n```",
        lambda: "What's the difference between a list and a tuple in Python? Short answer.",
        lambda: f"How do I read a file line by line in {lang}?",
        lambda: "What does `git stash` do?",
        lambda: f"Convert this to uppercase in {lang}: the string 'hello'.",
        lambda: "What is the keyboard shortcut to comment a line in VS Code?",
        lambda: "How do I install a package with pip?",
        lambda: f"Rename the variable x to count in this code:\n```\n{pick(rng, CODE_SNIPPETS)}\n```",
        lambda: "What HTTP status code means 'not found'?",
        lambda: f"Write a one-line {lang} expression that checks if a number is even.",
    ]
    hard = [
        lambda: f"Implement {pick(rng, DS)} in {lang} with O(1) or O(log n) operations, handle edge cases, "
                f"and write unit tests. Explain the complexity of each operation.",
        lambda: (lambda b: f"This code has a bug: {b[1]}. Find the root cause, explain why it happens, and "
                           f"give a corrected version.\n```\n{b[0]}```")(pick(rng, BUGGY)),
        lambda: f"Design the database schema and REST API for a multi-tenant {pick(rng, ['invoicing', 'booking', 'inventory', 'ticketing'])} "
                f"system. Explain the trade-offs of your indexing and isolation choices.",
        lambda: f"Write a {lang} function that parses arithmetic expressions with +, -, *, /, parentheses and "
                f"unary minus, respecting precedence, without using eval. Include tests.",
        lambda: f"Refactor this into a thread-safe, testable design and explain each change:\n```\n"
                f"{pick(rng, BUGGY)[0]}```",
        lambda: f"Why is my {lang} service's p99 latency spiking every few minutes while p50 is fine? "
                f"Walk me through a systematic debugging strategy.",
        lambda: "Write a regex-free tokenizer for a subset of SQL (SELECT, FROM, WHERE with AND/OR) and a "
                "recursive-descent parser that builds an AST.",
        lambda: pick(rng, ["Implement a thread-safe LRU cache.", "Write a Sudoku solver.", "Implement Dijkstra's algorithm.",
                           f"Implement a red-black tree in {lang}.", "Write a JSON parser from scratch.",
                           "Design a URL shortener that scales to 1B links."]),
        lambda: f"Compare async/await, threads and processes for a CPU-bound plus IO-bound pipeline in {lang}; "
                f"analyze when each wins and show code for the best option.",
    ]
    return easy, hard


def math_(rng: random.Random):
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
    easy = [
        lambda: f"What is {a} + {b}?",
        lambda: f"What is {a} times {c}?",
        lambda: f"Is {a} an even number?",
        lambda: f"Convert {a} kilometers to miles.",
        lambda: f"What's {c}% of {a * 10}?",
        lambda: f"Round {a}.{b} to the nearest whole number.",
        lambda: f"How many minutes are in {c} hours?",
        lambda: f"What is the square root of {c * c}?",
        lambda: f"{a} - {b} = ?",
    ]
    hard = [
        lambda: f"Prove that the square root of {pick(rng, [2, 3, 5, 7])} is irrational.",
        lambda: "Prove that there are infinitely many primes.",
        lambda: f"Evaluate the integral of x^{c} * e^x dx and show each step.",
        lambda: f"Solve the system: {a}x + {b}y = {c}, {b}x - {a}y = {a + c}. Show your work.",
        lambda: f"A bag has {c} red and {c + 3} blue balls. Three are drawn without replacement. What is the "
                f"probability that exactly two are red? Explain step by step.",
        lambda: r"Compute \lim_{x \to 0} \frac{\sin(" + str(c) + r"x) - " + str(c) + r"x}{x^3} and justify it.",
        lambda: f"Find all real solutions of x^4 - {c + 4}x^2 + {c * 4} = 0.",
        lambda: "Show that every bounded monotone sequence of real numbers converges.",
        lambda: f"Prove that sqrt({pick(rng, [2, 3, 5, 6, 7, 10])}) is irrational.",
        lambda: pick(rng, ["Derive the quadratic formula.", "Prove Fermat's little theorem.",
                           "Prove the AM-GM inequality for n numbers.", "Derive Euler's formula e^(ix) = cos x + i sin x.",
                           "Why is 0.999... equal to 1? Prove it.", "Prove that the harmonic series diverges."]),
        lambda: f"Find the eigenvalues and eigenvectors of the matrix [[{c}, 1], [1, {c}]] and diagonalize it.",
        lambda: f"How many ways can {c + 3} people sit around a round table if two of them refuse to sit "
                f"next to each other? Think step by step.",
    ]
    return easy, hard


def reasoning(rng: random.Random):
    n = rng.randint(3, 9)
    easy = [
        lambda: f"If today is {pick(rng, ['Monday', 'Friday', 'Sunday'])}, what day is tomorrow?",
        lambda: "Which is heavier, a kilo of feathers or a kilo of bricks?",
        lambda: f"Is a {pick(rng, ['whale', 'bat', 'dolphin', 'penguin'])} a mammal? Yes or no.",
        lambda: "What comes next: 2, 4, 6, 8, ?",
        lambda: "Which is bigger, 0.5 or 0.25?",
        lambda: "Tom is taller than Ann. Is Ann shorter than Tom?",
        lambda: f"If I have {n} apples and eat one, how many are left?",
        lambda: f"What is the opposite of '{pick(rng, WORDS)}'?",
        lambda: f"Which month comes after {pick(rng, ['March', 'July', 'October', 'December'])}?",
        lambda: f"Sort these words alphabetically: {', '.join(rng.sample(WORDS, 4))}.",
        lambda: f"Is {pick(rng, CITIES)} in {pick(rng, ['Europe', 'Asia', 'Africa', 'America'])}? Just the answer.",
    ]
    hard = [
        lambda: "Five people (A, B, C, D, E) sit in a row. A is not next to B, C is at one end, D is to the "
                "left of E, and B is in the middle. List every valid arrangement and explain your reasoning.",
        lambda: f"There are {n} boxes; exactly one holds a prize. Each box has a label, and exactly one label "
                f"is true. Box 1 says 'the prize is not here', box 2 says 'the prize is in box 1'. Analyze "
                f"the cases and determine where the prize is.",
        lambda: "A bat and a ball cost $1.10 in total. The bat costs $1.00 more than the ball. How much does "
                "the ball cost? Think carefully and explain why the intuitive answer is wrong.",
        lambda: f"You have {n} coins, one is counterfeit and lighter. What is the minimum number of weighings "
                f"on a balance scale to find it? Prove your answer is optimal.",
        lambda: "Evaluate this argument and identify any logical fallacies: 'Every successful company uses "
                "cloud computing, so moving to the cloud will make our company successful.'",
        lambda: "Three switches outside a room control three bulbs inside. You may enter the room once. "
                "How do you determine which switch controls which bulb? Explain step by step.",
        lambda: f"{n} people shake hands at a party; each shakes hands with everyone else exactly once. How many "
                f"handshakes are there, and why? Generalize to n people and prove it.",
        lambda: f"If it takes {n} machines {n} minutes to make {n} widgets, how long would {n * 20} machines take "
                f"to make {n * 20} widgets? Reason carefully.",
        lambda: f"A train leaves {pick(rng, CITIES)} at {n} am going 80 km/h; another leaves the other city, "
                f"{n * 60} km away, an hour later at 100 km/h. When and where do they meet? Show all steps.",
        lambda: f"Why might a policy of {pick(rng, ['four-day work weeks', 'free public transport', 'banning cars downtown'])} "
                f"backfire? Analyze second-order effects.",
        lambda: "Is the following reasoning valid? 'If it rains, the ground is wet. The ground is wet. Therefore "
                "it rained.' Explain the logic and give a counterexample.",
    ]
    return easy, hard


def writing(rng: random.Random):
    thing = pick(rng, THINGS)
    easy = [
        lambda: f"Write a haiku about {thing}.",
        lambda: f"Fix the typos in this paragraph:\n\n{pick(rng, PARAGRAPHS)}",
        lambda: f"Summarize this in one sentence:\n\n{pick(rng, PARAGRAPHS)}",
        lambda: f"Write a short birthday message for my {pick(rng, ['sister', 'boss', 'best friend', 'grandmother'])}.",
        lambda: f"Give me a catchy title for a blog post about {pick(rng, TOPICS)}.",
        lambda: "Rewrite this sentence to sound more formal: 'hey, can u send me the report asap?'",
        lambda: f"Write two sentences describing {thing}.",
        lambda: f"Make this email more polite:\n\n{pick(rng, PARAGRAPHS)}",
    ]
    hard = [
        lambda: f"Write a 1500-word essay on {pick(rng, TOPICS)}, with an introduction, three argued sections "
                f"with evidence, a counter-argument, and a conclusion.",
        lambda: f"Write a detailed technical report comparing three approaches to {pick(rng, ['caching', 'data replication', 'load balancing', 'fraud detection'])}, "
                f"including a decision matrix and recommendations.",
        lambda: f"Write the first chapter of a mystery novel set in {pick(rng, CITIES)}, with three distinct "
                f"characters, foreshadowing, and a twist at the end. Around 2000 words.",
        lambda: f"Draft a grant proposal for a community project about {pick(rng, TOPICS)}: objectives, "
                f"methodology, timeline, budget justification and evaluation plan.",
        lambda: f"Critique the structure and argument of this paragraph in detail and rewrite it to be more "
                f"persuasive:\n\n{pick(rng, PARAGRAPHS)}",
    ]
    return easy, hard


def chinese(rng: random.Random):
    t = pick(rng, CN_TOPICS)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    easy = [
        lambda: "你好！今天天气怎么样？",
        lambda: f"请把'{pick(rng, ['good morning', 'thank you very much', 'see you tomorrow'])}'翻译成中文。",
        lambda: f"写一首关于{pick(rng, CN_THINGS)}的短诗。",
        lambda: f"{a}加{b}等于多少？",
        lambda: "讲个笑话吧。",
        lambda: "推荐一本适合周末读的书。",
        lambda: f"用一句话解释什么是{t}。",
        lambda: "北京是哪个国家的首都？",
        lambda: "谢谢你的帮助！",
        lambda: f"“{pick(rng, ['高兴', '美丽', '重要', '困难'])}”的近义词是什么？",
    ]
    hard = [
        lambda: f"请详细分析{t}对社会的影响，比较不同观点，并给出你的结论。",
        lambda: "证明：根号2是无理数。请一步一步推导。",
        lambda: f"为什么{t}在过去十年发展这么快？请从技术、经济和政策三个方面分析。",
        lambda: pick(rng, ["证明勾股定理。", "为什么天空是蓝色的？请解释。", "推导一元二次方程的求根公式。",
                           "分析一下罗马帝国衰落的原因。", "证明素数有无穷多个。"]),
        lambda: "请用Python实现一个LRU缓存，要求get和put的时间复杂度为O(1)，并解释你的设计。",
        lambda: f"写一篇关于{t}的3000字论文，包括引言、文献综述、论证和结论。",
        lambda: f"一个袋子里有{a % 7 + 3}个红球和{b % 5 + 4}个蓝球，不放回地取三个，恰好两个红球的概率是多少？请仔细思考，展示推理过程。",
        lambda: f"比较三种{pick(rng, ['数据库索引', '排序算法', '负载均衡策略'])}的优缺点，并说明在什么场景下应该选择哪一种。",
    ]
    return easy, hard


CATEGORIES = {"chat": chat, "code": code, "math": math_, "reasoning": reasoning, "writing": writing,
              "chinese": chinese}
PER_CATEGORY = 110  # 660 rows in all


def with_context(rng: random.Random, prompt: str, label: str) -> dict:
    """Wrap some prompts as multi-turn chats, some with a system prompt; add max_tokens on some."""
    row: dict = {"prompt": prompt}
    r = rng.random()
    if r < 0.3:
        msgs = [{"role": "user", "content": prompt}]
        if rng.random() < 0.5:
            msgs.insert(0, {"role": "system", "content": pick(rng, [
                "You are a helpful assistant.", "You are a concise assistant.", "你是一个乐于助人的助手。",
                "You are an expert tutor. Be precise."])})
        if rng.random() < 0.4:
            prev = pick(rng, [("Hi!", "Hello! How can I help?"), ("Can you help me with something?", "Of course."),
                              ("I have a question.", "Sure, go ahead.")])
            msgs[-1:-1] = [{"role": "user", "content": prev[0]}, {"role": "assistant", "content": prev[1]}]
        row = {"messages": msgs}
    m = rng.random()
    if label == "easy":
        if m < 0.45:
            row["max_tokens"] = pick(rng, [16, 32, 64, 100, 128, 256])
        elif m < 0.55:
            row["max_tokens"] = pick(rng, [512, 1024])
    else:
        if m < 0.4:
            row["max_tokens"] = pick(rng, [1024, 2048, 4096])
        elif m < 0.5:
            row["max_tokens"] = pick(rng, [128, 256, 512])
    return row


def generate(seed: int = 7) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train, heldout = [], []
    for cat, make in CATEGORIES.items():
        rows, seen = [], set()
        attempts = 0
        while len(rows) < PER_CATEGORY and attempts < PER_CATEGORY * 50:
            attempts += 1
            easy, hard = make(rng)
            label = "hard" if rng.random() < 0.4 else "easy"
            prompt = pick(rng, hard if label == "hard" else easy)()
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append(dict(with_context(rng, prompt, label), label=label, category=cat))
        rng.shuffle(rows)
        cut = len(rows) // 4
        heldout += rows[:cut]
        train += rows[cut:]
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


def main() -> None:
    train, heldout = generate()
    for name, rows in (("train", train), ("heldout", heldout)):
        with open(HERE / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        hard = sum(r["label"] == "hard" for r in rows)
        print(f"{name}: {len(rows)} rows, {hard} hard")


if __name__ == "__main__":
    main()
