"""A deterministic, labelled shared memory of a content pipeline, for retrieval benchmarks.

The pipeline: a researcher gathers notes per topic, a writer drafts, an SEO agent keeps
metadata, a poster publishes to platforms, an analyst records weekly figures, readers comment.
Around that sit the distractors a real memory accumulates: run records, scratch notes and an
editorial calendar that name the same topics. Text comes from templates and per-domain
vocabulary with a fixed seed, so every run of the benchmark sees the same ~2,500 entries and
the same labelled questions.

Each question is a task as the scheduler would hand it to an agent, the namespaces that agent's
role reads, and the entries the run truly needs (the label).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from datetime import date, timedelta

DOMAINS: dict[str, tuple[list[str], list[str]]] = {
    "home energy": (
        ["home solar batteries", "heat pump installation", "solar panel cleaning",
         "smart thermostat savings", "attic insulation upgrades", "induction cooktop switching",
         "ev home charging", "portable solar generators"],
        ["kilowatt-hour", "inverter", "efficiency", "payback period", "tariff", "retrofit",
         "grid export", "rebate", "installer", "wattage"]),
    "baking": (
        ["sourdough starter care", "gluten free bread", "laminated croissant dough",
         "rye bread baking", "pizza dough fermentation", "cast iron cornbread",
         "whole wheat sandwich loaf", "bagel boiling technique"],
        ["hydration", "gluten", "proofing", "crumb", "levain", "oven spring", "fermentation",
         "flour blend", "crust", "yeast"]),
    "gardening": (
        ["balcony tomato growing", "raised bed soil mix", "composting kitchen scraps",
         "drip irrigation setup", "companion planting herbs", "winter garlic planting",
         "pollinator friendly borders", "indoor seed starting"],
        ["mulch", "germination", "compost", "seedlings", "nitrogen", "watering", "pests",
         "harvest", "frost", "perennials"]),
    "cycling": (
        ["commuter bike maintenance", "gravel bike tire pressure", "e-bike battery range",
         "winter cycling clothing", "bike fit basics", "tubeless tire setup",
         "chain lubrication", "bikepacking gear lists"],
        ["cadence", "drivetrain", "psi", "saddle", "derailleur", "puncture", "watts", "frame",
         "helmet", "commute"]),
    "personal finance": (
        ["emergency fund sizing", "index fund investing", "credit card debt payoff",
         "rent versus buy", "retirement account rollover", "household budget apps",
         "freelancer tax estimates", "high yield savings accounts"],
        ["interest rate", "portfolio", "expense ratio", "budget", "savings", "tax bracket",
         "compounding", "fees", "income", "allocation"]),
    "travel": (
        ["japan rail pass planning", "carry on packing lists", "travel insurance claims",
         "lisbon on a budget", "night train routes europe", "airport lounge access",
         "iceland ring road", "travel vaccinations"],
        ["itinerary", "booking", "layover", "visa", "luggage", "hostel", "fares", "passport",
         "route", "shoulder season"]),
    "software": (
        ["python type hints", "postgres index tuning", "docker image slimming",
         "git rebase workflow", "rust error handling", "kubernetes cost control",
         "sqlite wal mode", "css grid layouts"],
        ["latency", "benchmark", "deployment", "refactor", "query plan", "container",
         "compiler", "release", "dependency", "cache"]),
    "pets": (
        ["puppy crate training", "cat litter choices", "senior dog nutrition",
         "aquarium nitrogen cycle", "rabbit hutch setup", "dog separation anxiety",
         "cat scratching posts", "parrot enrichment toys"],
        ["veterinarian", "diet", "behaviour", "training", "treats", "enrichment", "grooming",
         "vaccines", "breed", "routine"]),
    "fitness": (
        ["couch to 5k plans", "kettlebell swing form", "marathon taper weeks",
         "desk worker mobility routines", "protein intake for lifters", "rowing machine technique",
         "home pull up progressions", "heart rate zone training"],
        ["reps", "recovery", "intervals", "pace", "strength", "warm-up", "injury", "endurance",
         "sets", "form"]),
    "coffee": (
        ["pour over ratios", "espresso grinder burrs", "cold brew concentrate",
         "home coffee roasting", "aeropress recipes", "milk steaming microfoam",
         "decaf processing methods", "coffee water chemistry"],
        ["extraction", "grind size", "bloom", "crema", "roast level", "beans", "acidity",
         "brew time", "temperature", "dose"]),
    "photography": (
        ["astrophotography milky way", "portrait lighting setups", "film camera buying",
         "street photography ethics", "raw editing workflow", "macro lens insects",
         "drone photo regulations", "wedding photo backups"],
        ["aperture", "exposure", "shutter speed", "iso", "lens", "sensor", "composition",
         "focus", "tripod", "histogram"]),
    "parenting": (
        ["toddler sleep regression", "screen time rules", "school lunch ideas",
         "teen allowance systems", "baby led weaning", "homework routines", "sibling rivalry",
         "family road trips"],
        ["routine", "bedtime", "tantrum", "milestones", "pediatrician", "chores", "snacks",
         "boundaries", "nap", "toys"]),
    "home repair": (
        ["leaky faucet repair", "drywall patching", "deck staining", "tile grout cleaning",
         "window draft sealing", "basement dehumidifier", "smart lock install",
         "gutter cleaning safety"],
        ["sealant", "caulk", "moisture", "screws", "primer", "ladder", "toolkit", "warranty",
         "contractor", "leak"]),
    "cooking": (
        ["weeknight stir fry", "batch cooking freezer meals", "knife sharpening basics",
         "fermented hot sauce", "slow cooker beans", "homemade pasta", "spice blending",
         "meal prep lunches"],
        ["recipe", "wok", "sauce", "simmer", "marinade", "pantry", "portion", "seasoning",
         "texture", "leftovers"]),
    "careers": (
        ["remote job interviews", "salary negotiation scripts", "portfolio websites",
         "career change at forty", "linkedin profile rewrite", "technical resume tips",
         "four day week pilots", "manager one on ones"],
        ["recruiter", "offer", "resume", "skills", "feedback", "promotion", "hiring",
         "network", "role", "manager"]),
    "outdoors": (
        ["ultralight backpacking tents", "beginner rock climbing", "kayak trip planning",
         "winter hiking safety", "wild camping etiquette", "trail running shoes",
         "water filter choices", "stargazing campsites"],
        ["trail", "summit", "gear", "weather", "map", "permit", "elevation", "layers",
         "campsite", "navigation"]),
}

SOURCES = ["Consumer Reports", "a 2023 field study", "the Which? test panel", "a long Reddit thread",
           "the national statistics office", "an industry white paper", "our reader survey",
           "a university lab", "a trade magazine", "a YouTube teardown", "a retailer's returns data",
           "an interview with a practitioner"]
EXPERTS = ["Dana Whitfield", "Rahul Menon", "Ines Carvalho", "Tom Becker", "Aiko Tanaka",
           "Marta Kowalska", "Sam Okafor", "Lena Fischer"]
PERIODS = ["two weeks", "a month", "three months", "a season", "six weeks", "a year"]
SEASONS = ["spring", "summer", "autumn", "winter"]
PLATFORMS = ["mastodon", "linkedin", "newsletter", "bluesky", "reddit"]
REFERRERS = ["google", "newsletter", "mastodon", "linkedin", "direct", "reddit", "bing"]
AGENTS = ["researcher", "writer", "seo", "poster", "analyst"]
COMMENTERS = ["maria_k", "jdoe", "greenthumb", "pedal_pusher", "budget_bea", "nomad_nik",
              "coffeegeek", "fixit_fred"]

NOTE_TEMPLATES = [
    "{source} surveyed {n} readers: {pct}% said {j1} was their main worry about {topic}.",
    "According to {source}, getting the {j1} right matters more than {j2} for {topic}.",
    "Common mistake with {topic}: ignoring {j1}. {source} recommends checking it every {period}.",
    "Cost note: a typical {topic} budget runs {money}, mostly {j1} and {j2}.",
    "Interview with {expert}: {topic} is mostly about {j1}; beginners over-think {j2}.",
    "{source} compared {n} approaches to {topic}; the winner balanced {j1} and {j2}.",
    "Open question for the piece: how does {j1} change in {season}? Ask {expert}.",
    "Data point from {source}: {pct}% better {j1} after {period}, with {j2} unchanged.",
    "{source} found {j1} drops by {pct}% when {j2} is handled first.",
    "Counterpoint ({expert}): the usual advice on {j1} is overstated; {j2} matters more.",
]
PARAGRAPHS = [
    "Most guides to {topic} start with {j1}, and for good reason: {source} found that {pct}% of "
    "beginners who struggled had skipped it. Get that right and {j2} becomes far easier.",
    "The second thing to understand is {j2}. {expert} puts it simply: measure first, then "
    "adjust one variable at a time, and give each change {period} before judging it.",
    "Budget matters too. Expect to spend around {money} to do {topic} properly, most of it on "
    "{j1}. Cheaper shortcuts exist, but they tend to cost more in {j3} later.",
    "A word on {j3}: it is the part readers ask about most in the comments, and the answer "
    "depends on {season} conditions more than on any product you can buy.",
    "If you only remember one thing, make it this: {topic} rewards patience. Track {j1} and "
    "{j2} in a notebook, and after {period} the pattern will be obvious.",
    "We tested the popular advice against our own numbers. On {j2}, the conventional wisdom "
    "held; on {j3}, it did not, and {expert} agreed the old rule of thumb is out of date.",
]
COMMENT_TEMPLATES = [
    "Great piece, but you skipped {j1}. In my experience that is where most people go wrong.",
    "Tried this for {period} and the {j2} tip alone was worth it. Thanks!",
    "Could you cover {j1} versus {j2} in more depth? The article felt rushed there.",
    "Small correction: the figure on {j1} looks off by about {pct}%.",
    "Shared this with my partner; we are starting in {season}.",
]
SCRATCH_TEMPLATES = [
    "Remember to cross-link {topic} with {other} when both are live.",
    "Idea: a comparison piece, {topic} versus {other}, angle on {j1}.",
    "Readers keep confusing {topic} with {other}; add a clarifying box.",
    "Queue a follow-up on {topic} once the {j1} data is in.",
]


@dataclass
class Question:
    task: str
    role: str
    namespaces: list[str]
    needed: list[str]  # "namespace/key" of every entry the run needs


@dataclass
class Dataset:
    entries: list[tuple[str, str, object]] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)


def slugify(name: str) -> str:
    return name.replace(" ", "-")


class _Writer:
    """Fills templates for one topic from its domain vocabulary, all draws from one RNG."""

    def __init__(self, rng: random.Random, topic: str, jargon: list[str]) -> None:
        self.rng, self.topic, self.jargon = rng, topic, jargon
        self.last: dict[str, str] = {}  # the values of the last fill, to phrase questions

    def fill(self, template: str, **extra: str) -> str:
        j1, j2, j3 = self.rng.sample(self.jargon, 3)
        values = {"topic": self.topic, "j1": j1, "j2": j2, "j3": j3,
                  "source": self.rng.choice(SOURCES), "expert": self.rng.choice(EXPERTS),
                  "period": self.rng.choice(PERIODS), "season": self.rng.choice(SEASONS),
                  "n": str(self.rng.randint(12, 900)), "pct": str(self.rng.randint(8, 74)),
                  "money": f"${self.rng.randint(2, 90) * 10}", **extra}
        text = template.format(**values)
        self.last = values
        return text[0].upper() + text[1:]


def generate(seed: int = 7) -> Dataset:
    """The labelled data set; the same seed always gives the same entries and questions."""
    rng = random.Random(seed)
    data = Dataset()
    topics = [(topic, domain, jargon) for domain, (subjects, jargon) in DOMAINS.items()
              for topic in subjects]
    start = date(2024, 3, 4)
    for topic, domain, jargon in topics:
        _topic_entries(data, rng, topic, domain, jargon, start)
    _distractors(data, rng, [t for t, _, _ in topics], start)
    for topic, _, _ in topics:
        _questions(data, rng, topic)
    return data


def _topic_entries(data: Dataset, rng: random.Random, topic: str, domain: str,
                   jargon: list[str], start: date) -> None:
    w, slug = _Writer(rng, topic, jargon), slugify(topic)
    add = data.entries.append
    lookups = []
    for i in range(1, rng.randint(4, 7) + 1):
        template = rng.choice(NOTE_TEMPLATES)
        add(("research", f"{slug}/note-{i}", {
            "finding": w.fill(template), "source": rng.choice(SOURCES),
            "gathered": (start + timedelta(days=rng.randint(0, 20))).isoformat(),
            "confidence": rng.choice(["high", "medium", "low"])}))
        if "{j2}" in template:
            lookups.append((f"research/{slug}/note-{i}", w.last))
    if lookups and rng.random() < 0.5:
        # An ad-hoc lookup mid-run: it names what the note is about, not the note's key.
        needed, said = rng.choice(lookups)
        data.questions.append(Question(
            task=f"For the {topic} piece: what do the notes say about {said['j1']} versus "
                 f"{said['j2']}?", role="lookup", namespaces=["research"], needed=[needed]))
    title = f"{topic.capitalize()}: {rng.choice(['a practical guide', 'what actually works', 'the mistakes to avoid', 'a beginner checklist'])}"
    paragraphs = [w.fill(p) for p in rng.sample(PARAGRAPHS, rng.randint(4, 6))]
    add(("drafts", slug, {"title": title, "status": rng.choice(["draft", "review", "published"]),
                          "outline": [p.split(".")[0][:60] for p in paragraphs[:4]],
                          "body": "\n\n".join(paragraphs), "domain": domain}))
    j1, j2 = rng.sample(jargon, 2)
    add(("seo", slug, {"title": title[:60], "slug": slug,
                       "meta_description": f"Everything we learned about {topic}: {j1}, {j2} "
                                           f"and the costs nobody mentions."[:155],
                       "keywords": [topic, j1, j2], "canonical": f"https://blog.example/{slug}"}))
    for platform in rng.sample(PLATFORMS, rng.randint(1, 3)):
        posted = start + timedelta(days=rng.randint(21, 40))
        add(("posts", f"{slug}/{platform}", {
            "platform": platform, "status": rng.choice(["posted", "posted", "scheduled", "failed"]),
            "url": f"https://{platform}.example/pipeline/{rng.randint(10**5, 10**6)}",
            "posted_at": posted.isoformat(), "blurb": f"New: {title}"}))
    first_week = rng.randint(14, 18)
    for week in range(first_week, first_week + rng.randint(4, 8)):
        views = rng.randint(80, 9000)
        add(("analytics", f"{slug}/2024-w{week:02d}", {
            "week": f"2024-W{week:02d}", "views": views,
            "clicks": views * rng.randint(2, 12) // 100, "avg_read_s": rng.randint(25, 240),
            "top_referrer": rng.choice(REFERRERS)}))
    for i in range(1, rng.randint(1, 4) + 1):
        add(("comments", f"{slug}/{i}", {"author": rng.choice(COMMENTERS),
                                          "text": w.fill(rng.choice(COMMENT_TEMPLATES))}))


def _distractors(data: Dataset, rng: random.Random, topics: list[str], start: date) -> None:
    """Entries that name topics without being what a run needs: the noise of a real memory."""
    for week in range(10, 40):
        planned = rng.sample(topics, 4)
        data.entries.append(("calendar", f"2024-w{week:02d}", {
            "week": f"2024-W{week:02d}", "planned": planned,
            "notes": f"Lead story: the {planned[0]} article; analytics review on Friday."}))
    for n in range(1, 241):
        agent, topic = rng.choice(AGENTS), rng.choice(topics)
        data.entries.append(("runs", f"{agent}/{n:04d}", {
            "agent": agent, "outcome": rng.choice(["ok", "ok", "ok", "timeout", "error"]),
            "summary": f"{agent} run on the {topic} article finished in {rng.randint(20, 600)} s",
            "started": (start + timedelta(hours=n * 7)).isoformat()}))
    for n in range(1, 121):
        agent = rng.choice(AGENTS)
        topic, other = rng.sample(topics, 2)
        w = _Writer(rng, topic, ["tone", "structure", "sources", "headline", "examples"])
        data.entries.append((f"scratch-{agent}", f"{n:04d}",
                             {"text": w.fill(rng.choice(SCRATCH_TEMPLATES), other=other)}))


TASKS = {
    "writer": ("Write the article about {topic} from the research notes.",
               ["research"], lambda s, e: [k for k in e if k.startswith(f"research/{s}/")]),
    "seo": ("Update the SEO title and meta description for the {topic} article.",
            ["drafts", "seo"], lambda s, e: [f"drafts/{s}", f"seo/{s}"]),
    "poster": ("Post the {topic} article to {platform}; check where it was already posted.",
               ["seo", "posts"],
               lambda s, e: [f"seo/{s}", *[k for k in e if k.startswith(f"posts/{s}/")]]),
    "analyst": ("Write the weekly analytics report for the {topic} article.",
                ["analytics"], lambda s, e: [k for k in e if k.startswith(f"analytics/{s}/")]),
    "editor": ("Revise the {topic} draft using the reader comments.",
               ["drafts", "comments"],
               lambda s, e: [f"drafts/{s}", *[k for k in e if k.startswith(f"comments/{s}/")]]),
}


def _questions(data: Dataset, rng: random.Random, topic: str) -> None:
    keys = [f"{ns}/{key}" for ns, key, _ in data.entries]
    for role in rng.sample(sorted(TASKS), 2):
        template, namespaces, needed = TASKS[role]
        task = template.format(topic=topic, platform=rng.choice(PLATFORMS))
        data.questions.append(Question(task=task, role=role, namespaces=namespaces,
                                       needed=needed(slugify(topic), keys)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", help="write the data set as JSON to this file")
    args = parser.parse_args()
    data = generate(args.seed)
    doc = {"entries": [{"namespace": ns, "key": k, "value": v} for ns, k, v in data.entries],
           "questions": [q.__dict__ for q in data.questions]}
    if args.out:
        with open(args.out, "w") as out:
            json.dump(doc, out, indent=1)
    print(f"{len(data.entries)} entries, {len(data.questions)} questions (seed {args.seed})")


if __name__ == "__main__":
    main()
