"""Questions about the pipeline memory, written by hand apart from its generator.

None reuses a template of `pipeline_memory.py` or names a namespace: each asks the way a person
would, paraphrasing the topic. The label is the set of entries a good answer needs, given as
"namespace/key" prefixes (an entry whose "namespace/key" starts with one is needed).
"""

QUESTIONS: list[tuple[str, list[str]]] = [
    ("Which findings do we have on storing rooftop solar power in home battery packs?",
     ["research/home-solar-batteries/"]),
    ("How many people read the heat pump article each week, and where did they come from?",
     ["analytics/heat-pump-installation/"]),
    ("What did readers write in response to the article about keeping a sourdough culture alive?",
     ["comments/sourdough-starter-care/"]),
    ("Give me the page title, meta description and keywords we chose for growing tomatoes on a "
     "balcony.", ["seo/balcony-tomato-growing"]),
    ("Where and when was the bike upkeep article shared on social media?",
     ["posts/commuter-bike-maintenance/"]),
    ("What is the current text and status of the article on how big a rainy-day fund should be?",
     ["drafts/emergency-fund-sizing"]),
    ("What do our sources say about buying a rail pass for a trip around Japan?",
     ["research/japan-rail-pass-planning/"]),
    ("How did the article on Python type annotations perform with visitors?",
     ["analytics/python-type-hints/"]),
    ("What feedback did the audience leave on the guide to crate training a puppy?",
     ["comments/puppy-crate-training/"]),
    ("Which facts and figures did we collect about going from the sofa to running five km?",
     ["research/couch-to-5k-plans/"]),
    ("Which platforms carried the pour-over coffee ratio piece?", ["posts/pour-over-ratios/"]),
    ("Headline and search keywords for the piece on lighting portraits?",
     ["seo/portrait-lighting-setups"]),
    ("What does the manuscript about toddlers waking at night say so far?",
     ["drafts/toddler-sleep-regression"]),
    ("Any evidence on how to patch holes in plasterboard walls?", ["research/drywall-patching/"]),
    ("Reader reactions to the quick weekday stir-fry article?", ["comments/weeknight-stir-fry/"]),
    ("Visitor numbers and reading time for the pay raise negotiation article?",
     ["analytics/salary-negotiation-scripts/"]),
    ("What have we learned about planning a multi-day paddling trip by kayak?",
     ["research/kayak-trip-planning/"]),
    ("Where did the article on fixing a dripping tap get published, and on what date?",
     ["posts/leaky-faucet-repair/"]),
    ("What title and description will search engines show for the espresso grinder article?",
     ["seo/espresso-grinder-burrs"]),
    ("How is the article about slimming container images coming along?",
     ["drafts/docker-image-slimming"]),
]
