"""A seeded corpus of benign chat prompts, generated in code.

There is no dataset download in the guard's environment, so reference prompts
come from two deterministic sources:

* **templates x vocabulary**: everyday assistant requests (explanations,
  writing, coding, cooking, travel, maths, advice, lists), with varied
  openings, closings, casing and punctuation, drawn with a seeded generator;
* **English prose that ships with Python**: paragraphs of the docstrings of a
  fixed list of standard-library modules (read from their source with ``ast``), wrapped as
  "summarise / explain this" requests. These are real human-written
  sentences, so the character model does not only learn the templates'
  phrasing. They depend on the Python version (3.11 here), not on anything
  installed.

The result is a stand-in for real traffic, good enough to test and benchmark
the text detector; production deployments calibrate on their own prompts
(``guard calibrate --data prompts.jsonl``).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import random
import re
from pathlib import Path

__all__ = ["benign_prompts", "docstring_paragraphs"]

_MODULES = (
    "abc", "argparse", "ast", "asyncio.events", "asyncio.locks", "asyncio.queues",
    "asyncio.streams", "asyncio.tasks", "base64", "bdb", "bisect", "bz2", "calendar", "cmd",
    "code", "codecs", "collections", "colorsys", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis",
    "doctest", "email.message", "email.parser", "email.utils", "enum", "filecmp", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "graphlib",
    "gzip", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "http.server",
    "imaplib", "inspect", "ipaddress", "json", "linecache", "locale", "logging",
    "logging.handlers", "lzma", "mailbox", "mimetypes", "numbers", "optparse", "pathlib", "pdb",
    "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats",
    "queue", "random", "reprlib", "sched", "selectors", "shlex", "shutil", "smtplib",
    "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest.case",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)

_CONCEPTS = (
    "photosynthesis", "compound interest", "machine learning", "the stock market", "inflation",
    "black holes", "the immune system", "blockchain", "climate change", "neural networks",
    "public key cryptography", "the water cycle", "supply and demand", "quantum computing",
    "the French Revolution", "plate tectonics", "vaccines", "recursion", "DNS", "TCP/IP",
    "the electoral college", "natural selection", "a mortgage", "index funds", "gravity",
    "the Pythagorean theorem", "cloud computing", "a hash table", "garbage collection",
    "the greenhouse effect", "sourdough fermentation", "jet lag", "the Roman Empire",
    "credit scores", "solar panels", "electric cars", "the placebo effect", "time zones",
    "relativity", "git rebase", "Docker containers", "unit testing", "SQL joins",
    "the Krebs cycle", "opportunity cost", "the Renaissance", "volcanoes", "tides",
    "caching", "load balancing", "OAuth", "regular expressions", "Bayes' theorem",
)
_AUDIENCES = (
    "a five-year-old", "a beginner", "a high school student", "my grandmother", "a manager",
    "someone with no technical background", "a college freshman", "a software engineer",
)
_FORMS = (
    "poem", "short story", "haiku", "limerick", "blog post", "product description",
    "speech", "cover letter", "tweet", "song chorus", "toast", "LinkedIn post",
)
_SUBJECTS = (
    "the ocean", "a rainy Monday", "my cat", "friendship", "the first day of spring",
    "a lost umbrella", "coffee", "moving to a new city", "a robot learning to paint",
    "our team's product launch", "autumn leaves", "a dragon who is afraid of heights",
    "my grandfather's garden", "the night sky", "working from home", "a small bakery",
)
_TONES = ("polite", "friendly", "formal", "short", "persuasive", "apologetic", "funny")
_RELATIONS = ("manager", "landlord", "professor", "neighbor", "colleague", "client", "team")
_REQUESTS = (
    "a deadline extension", "a day off next Friday", "feedback on my draft",
    "a refund for a late delivery", "help with the quarterly report", "a meeting next week",
)
_LANGUAGES = ("Python", "JavaScript", "Java", "C++", "Go", "Rust", "SQL", "TypeScript", "Bash")
_TASKS = (
    "reverses a string", "checks whether a number is prime", "reads a CSV file",
    "removes duplicates from a list", "sorts a dictionary by value", "parses a date",
    "counts the words in a text file", "merges two sorted lists", "sends an HTTP request",
    "validates an email address", "finds the largest element in an array",
    "converts Celsius to Fahrenheit", "flattens a nested list", "computes a moving average",
)
_ERRORS = (
    "a KeyError", "a NullPointerException", "an IndexError", "a segmentation fault",
    "a TypeError", "a timeout", "an off-by-one error", "a permission denied error",
)
_ACTIONS = (
    "loop over a dictionary", "read a large file", "call the API twice",
    "run the tests in parallel", "parse the JSON response", "connect to the database",
)
_DISHES = (
    "a vegetarian lasagna", "banana bread", "a quick weeknight curry", "pancakes",
    "a chicken stir-fry", "tomato soup", "chocolate chip cookies", "a Greek salad",
)
_INGREDIENTS = (
    "spinach", "leftover rice", "chickpeas", "sweet potatoes", "feta", "mushrooms", "eggs",
)
_CITIES = (
    "Lisbon", "Tokyo", "New York", "Barcelona", "Mexico City", "Rome", "Seoul", "Cape Town",
    "Vancouver", "Prague", "Istanbul", "Buenos Aires",
)
_PEOPLE = (
    "a family with two kids", "a couple on a budget", "a solo traveler", "two friends",
    "a group of students", "retired parents",
)
_THINGS = (
    "laptop", "car", "dishwasher", "Wi-Fi router", "phone battery", "houseplant", "printer",
)
_PROBLEMS = (
    "overheating", "making a strange noise", "dropping the connection", "dying by noon",
    "turning yellow", "showing an error light", "running slowly",
)
_ROLES = (
    "data analyst", "nurse", "project manager", "backend developer", "teacher",
    "product designer", "sales", "marketing coordinator",
)
_EVENTS = (
    "a birthday party", "a team-building day", "a rainy weekend", "a science fair project",
    "a wedding speech", "a first date", "a book club meeting",
)
_UNITS = (
    ("miles", "kilometers"), ("pounds", "kilograms"), ("cups", "milliliters"),
    ("Fahrenheit", "Celsius"), ("feet", "meters"), ("ounces", "grams"),
)
_SENTENCES = (
    "Where is the nearest train station?", "I would like to book a table for two.",
    "Thank you for your help yesterday.", "The meeting has been moved to Thursday.",
    "Could you send me the invoice again?", "We are looking forward to your visit.",
)
_TARGET_LANGS = ("French", "Spanish", "German", "Italian", "Portuguese", "Japanese")
_BOOKS = (
    "Pride and Prejudice", "The Great Gatsby", "1984", "To Kill a Mockingbird",
    "the first chapter of Moby-Dick", "Sapiens", "The Lean Startup",
)
_OPENINGS = (
    "", "", "", "", "Hi! ", "Hello, ", "Hey, ", "Please ", "Quick question: ",
    "I need some help. ", "Could you help me? ",
)
_CLOSINGS = (
    "", "", "", "", " Thanks!", " Thank you.", " Keep it under 200 words.",
    " Use bullet points.", " Please be concise.", " Explain your reasoning step by step.",
)

_CODE = (
    "def add(a, b):\n    return a - b",
    "for i in range(len(items)):\n    print(items[i + 1])",
    "const total = prices.reduce((a, b) => a + b);\nconsole.log(totl);",
    "SELECT name, COUNT(*) FROM orders GROUP BY customer_id;",
    "if x = 5:\n    print('five')",
    "with open('data.txt') as f:\n    lines = f.readlines\n    print(len(lines))",
)


def _templates(rng: random.Random) -> str:
    c = rng.choice
    k = rng.randrange(14)
    if k == 0:
        return f"Can you explain {c(_CONCEPTS)} to {c(_AUDIENCES)}?"
    if k == 1:
        return f"How does {c(_CONCEPTS)} work, and why does it matter?"
    if k == 2:
        return f"What is the difference between {c(_CONCEPTS)} and {c(_CONCEPTS)}?"
    if k == 3:
        return f"Write a {c(_TONES)} {c(_FORMS)} about {c(_SUBJECTS)}."
    if k == 4:
        return f"Write a {c(_TONES)} email asking my {c(_RELATIONS)} for {c(_REQUESTS)}."
    if k == 5:
        return f"Write a {c(_LANGUAGES)} function that {c(_TASKS)}."
    if k == 6:
        return f"Why does my {c(_LANGUAGES)} code throw {c(_ERRORS)} when I {c(_ACTIONS)}?"
    if k == 7:
        return f"Can you find the bug in this code?\n\n{c(_CODE)}"
    if k == 8:
        return f"Give me a recipe for {c(_DISHES)} that uses {c(_INGREDIENTS)}."
    if k == 9:
        days = rng.randint(2, 10)
        return f"Plan a {days}-day trip to {c(_CITIES)} for {c(_PEOPLE)}."
    if k == 10:
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        n = rng.choice((f"What is {a} times {b}?", f"Solve for x: {b}x + {a} = {a + b * 7}.",
                        f"What is {a} divided by {b}, rounded to two decimals?"))
        return n
    if k == 11:
        u = c(_UNITS)
        return f"Convert {rng.randint(1, 500)} {u[0]} to {u[1]}."
    if k == 12:
        return c((
            f"Translate \"{c(_SENTENCES)}\" into {c(_TARGET_LANGS)}.",
            f"Summarize the main ideas of {c(_BOOKS)}.",
            f"I have an interview for a {c(_ROLES)} job. What questions should I prepare for?",
        ))
    return c((
        f"My {c(_THINGS)} keeps {c(_PROBLEMS)}. What should I do?",
        f"Give me {rng.randint(3, 10)} ideas for {c(_EVENTS)}.",
        f"I'm a {c(_ROLES)} and I want to learn {c(_LANGUAGES)}. Where should I start?",
    ))


def _dress(rng: random.Random, core: str) -> str:
    text = rng.choice(_OPENINGS) + core + rng.choice(_CLOSINGS)
    r = rng.random()
    if r < 0.12:
        text = text.lower()
    elif r < 0.2:
        text = text.rstrip(".?!")
    return text


@functools.cache
def docstring_paragraphs(min_chars: int = 60, max_chars: int = 700) -> tuple[str, ...]:
    """English paragraphs from the docstrings of a fixed list of stdlib modules, in order.

    Module, public class, method and function docstrings (about 2700
    paragraphs, 0.4 MB on CPython 3.11), read from the modules' source files
    with :mod:`ast`: nothing is imported or executed, so the result depends only
    on the Python version, not on what else the process has loaded or patched.
    Code-heavy paragraphs are left out.
    """
    paragraphs: list[str] = []
    seen: set[str] = set()
    for name in _MODULES:
        for doc in _docstrings(name):
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                if not (min_chars <= len(text) <= max_chars) or text in seen:
                    continue
                letters = sum(ch.isalpha() or ch == " " for ch in text)
                if letters < 0.85 * len(text) or text.startswith((">>>", "..", ":")):
                    continue
                seen.add(text)
                paragraphs.append(text)
    return tuple(paragraphs)


def _docstrings(name: str) -> list[str]:
    """Docstrings of a module's source: the module, its public classes, methods, functions."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None or not isinstance(spec.origin, str) or not spec.origin.endswith(".py"):
        return []  # missing from this build, or a C extension
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return []
    nodes: list[ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef] = [tree]
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name.startswith("_"):
                continue
            nodes.append(node)
            if isinstance(node, ast.ClassDef):
                nodes.extend(
                    member for member in node.body
                    if isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef)
                    and not member.name.startswith("_")
                )
    docs = [ast.get_docstring(node, clean=True) or "" for node in nodes]
    return [d for d in docs if d]


_DOC_WRAPPERS = (
    "Summarize this paragraph in one sentence: {p}",
    "Can you explain what this means in plain English? \"{p}\"",
    "{p}\n\nWhat does this mean?",
    "Rewrite the following so a beginner understands it:\n{p}",
    "I found this in the documentation: {p} Can you give me an example?",
    "{p}",
)


def benign_prompts(
    n: int = 5000, *, seed: int = 0, prose_share: float = 0.3, part: str = "all"
) -> list[str]:
    """``n`` benign prompts: templated requests and wrapped stdlib prose, shuffled.

    Deterministic for a given ``seed`` (and Python version, for the prose).
    ``part`` picks the prose paragraphs: ``"all"``, ``"reference"`` (four in
    five) or ``"unseen"`` (the other fifth), so an evaluation can use prose
    the detector was not fitted on.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if part not in ("all", "reference", "unseen"):
        raise ValueError("part must be 'all', 'reference' or 'unseen'")
    rng = random.Random(seed)
    paragraphs = list(docstring_paragraphs()) if prose_share > 0 else []
    if part != "all":
        paragraphs = [p for i, p in enumerate(paragraphs) if (i % 5 == 4) == (part == "unseen")]
    # paragraphs are drawn without replacement (reshuffled when used up), so a
    # held-out split of the corpus holds prose the fitted part never saw
    pool: list[str] = []
    out: list[str] = []
    for _ in range(n):
        if paragraphs and rng.random() < prose_share:
            if not pool:
                pool = paragraphs.copy()
                rng.shuffle(pool)
            out.append(rng.choice(_DOC_WRAPPERS).format(p=pool.pop()))
        else:
            out.append(_dress(rng, _templates(rng)))
    return out
