"""Text for the shipped sample corpus: handwritten paragraphs plus seeded template documents.

Used only by ``make_sample_assets`` to regenerate ``examples/data/sample_corpus.jsonl``; the
output depends only on the seed, so the corpus (and the tokenizer trained on it) is
reproducible.
"""

from __future__ import annotations

import random

HANDWRITTEN = (
    "The river had been low all summer, and by August the children could walk across it "
    "without getting their knees wet. Their grandmother said it had not been this dry since "
    "the year the mill burned down.",
    "To make a simple loaf of bread, mix flour, water, salt and a little yeast. Knead the "
    "dough for ten minutes, let it rise until doubled, shape it, and bake it in a hot oven "
    "until the crust sounds hollow when tapped.",
    "A prime number has exactly two divisors: one and itself. The first few primes are 2, 3, "
    "5, 7, 11 and 13. Euclid proved more than two thousand years ago that there is no largest "
    "prime.",
    "Dear Sam,\nThanks for the postcard from Lisbon. The tiles look amazing. We are all fine "
    "here, although the cat has decided that the new sofa belongs to her.\nLove, Jo",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It happens "
    "in the chloroplasts of plant cells, which contain the green pigment chlorophyll.",
    "The meeting was moved to Thursday at 3 p.m. because the projector in room 204 is broken. "
    "Please bring your own laptop and a copy of the quarterly report.",
    "\"Are you sure this is the right road?\" asked Mina.\n\"No,\" said her brother, \"but it "
    "is the only road, so it will have to do.\"",
    "Honey never spoils. Archaeologists have found pots of honey in ancient tombs that were "
    "still edible after thousands of years, thanks to its low water content and high acidity.",
    "In a linked list, each node stores a value and a pointer to the next node. Inserting at "
    "the front takes constant time, but finding the k-th element takes time proportional to k.",
    "The café on the corner serves the best crème brûlée in town — or so the sign claims. "
    "Nobody has ever checked.",
    "Step 1: unplug the router. Step 2: wait thirty seconds. Step 3: plug it back in. Step 4: "
    "if the light is still red, call the help desk.",
    "Octopuses have three hearts and blue blood. Two hearts pump blood through the gills, "
    "while the third pumps it through the rest of the body.",
    "The train to the coast leaves at 7:45 every morning. On weekends it is often crowded, so "
    "buy a ticket the day before and try to sit on the left side for the sea view.",
    "Water boils at 100 degrees Celsius at sea level, but at lower temperatures on mountains, "
    "because the air pressure is lower. That is why pasta takes longer to cook at altitude.",
    "She planted tomatoes, beans and a row of sunflowers. By July the sunflowers were taller "
    "than the fence, and the neighbours' children came every day to measure them.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5",
    "The library will be closed on Monday for the public holiday. Books due that day may be "
    "returned on Tuesday without a late fee.",
    "A good night's sleep helps memory. During sleep the brain replays the day's experiences "
    "and strengthens the connections that matter.",
    "The old lighthouse keeper wrote in his log every evening: the weather, the ships he saw, "
    "and whether the lamp had needed cleaning. The logs span forty-one years.",
    "Recycling one aluminium can saves enough energy to run a television for about three "
    "hours. Aluminium can be recycled again and again without losing quality.",
    "Q: What has keys but cannot open locks?\nA: A piano.",
    "The committee agreed on three priorities for next year: repair the bridge, extend the "
    "bus route to the hospital, and plant two hundred trees along the main road.",
    "Mount Everest grows by a few millimetres every year, pushed upward as the Indian plate "
    "slides beneath the Eurasian plate.",
    "He opened the box slowly. Inside, wrapped in yellow newspaper, was a silver pocket watch "
    "that had stopped at exactly twelve minutes past four.",
    "Shopping list: eggs, milk, two onions, rice, olive oil, lemons, and something for "
    "dessert.",
    "The speed of light in a vacuum is about 299,792 kilometres per second. Light from the Sun "
    "takes a little over eight minutes to reach the Earth.",
    "Our team won the match 3-1 after a slow first half. The second goal, a long shot from "
    "outside the box, was the best of the season.",
    "Bees communicate the direction of flowers through a waggle dance. The angle of the dance "
    "relative to vertical matches the angle between the flowers and the Sun.",
    "It rained for nine days straight. On the tenth day the sun came out, and the whole town "
    "seemed to step outside at once, blinking.",
    "A binary search repeatedly halves a sorted range. Searching a million items needs at most "
    "about twenty comparisons.",
)

_NAMES = ("Alice", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
          "Kira", "Leo", "Maya", "Noah", "Olga", "Pablo", "Rosa", "Tariq", "Uma", "Victor")
_PLACES = ("the market", "the harbour", "the old school", "the forest", "the museum",
           "the train station", "the bakery", "the park", "the hill above town", "the library")
_OBJECTS = ("a red umbrella", "an old map", "a tiny key", "a blue notebook", "a broken clock",
            "a letter", "a wooden box", "a pair of glasses", "a paper kite", "a silver coin")
_FEELINGS = ("happy", "curious", "tired", "surprised", "nervous", "calm", "proud", "puzzled")
_CITIES = ("Oslo", "Lima", "Cairo", "Hanoi", "Quito", "Perth", "Dublin", "Nairobi", "Kyoto",
           "Porto", "Denver", "Tallinn")
_WEATHER = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "stormy", "mild")
_ANIMALS = ("fox", "owl", "otter", "heron", "badger", "hedgehog", "deer", "rabbit", "crow")
_FOODS = ("soup", "salad", "pancakes", "curry", "stew", "pie", "noodles", "risotto")
_INGREDIENTS = ("carrots", "garlic", "potatoes", "rice", "mushrooms", "spinach", "lentils",
                "tomatoes", "onions", "butter", "cheese", "peppers")
_TOPICS = ("volcanoes", "tides", "magnets", "clouds", "glaciers", "rainbows", "earthquakes",
           "comets", "coral reefs", "deserts")


def _story(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    return (f"One {rng.choice(('morning', 'evening', 'afternoon'))}, {name} went to "
            f"{rng.choice(_PLACES)} and found {rng.choice(_OBJECTS)}. {name} felt "
            f"{rng.choice(_FEELINGS)} and showed it to {other}. \"Where did you get that?\" "
            f"asked {other}. They decided to take it to {rng.choice(_PLACES)} the next day.")


def _weather(rng: random.Random) -> str:
    city = rng.choice(_CITIES)
    high = rng.randint(-5, 35)
    low = high - rng.randint(3, 12)
    return (f"Weather report for {city}: {rng.choice(_WEATHER)} in the morning, "
            f"{rng.choice(_WEATHER)} later. High of {high} degrees, low of {low}. Wind "
            f"{rng.randint(5, 60)} km/h from the {rng.choice(('north', 'south', 'east', 'west'))}.")


def _recipe(rng: random.Random) -> str:
    items = rng.sample(_INGREDIENTS, rng.randint(3, 5))
    minutes = rng.choice((15, 20, 25, 30, 40, 45, 60))
    return (f"Simple {rng.choice(_FOODS)}: you will need {', '.join(items[:-1])} and "
            f"{items[-1]}. Chop everything, cook it gently for {minutes} minutes, season to "
            f"taste and serve warm. Serves {rng.randint(2, 6)}.")


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    c, d = rng.randint(2, 30), rng.randint(2, 30)
    return (f"Practice: {a} plus {b} equals {a + b}. {a} minus {b} equals {a - b}. "
            f"{c} times {d} equals {c * d}.")


def _animal_fact(rng: random.Random) -> str:
    animal = rng.choice(_ANIMALS)
    return (f"The {animal} is most active at {rng.choice(('dawn', 'dusk', 'night', 'midday'))}. "
            f"A {animal} was seen near {rng.choice(_PLACES)} on {rng.randint(1, 28)} "
            f"{rng.choice(('March', 'June', 'September', 'November'))}, which is "
            f"{rng.choice(('unusual', 'quite common', 'rare', 'expected'))} for the season.")


def _lesson(rng: random.Random) -> str:
    topic = rng.choice(_TOPICS)
    name = rng.choice(_NAMES)
    return (f"Today's lesson is about {topic}. {name} asked why {topic} form, and the teacher "
            f"drew a diagram on the board. Homework: read pages {rng.randint(10, 90)} to "
            f"{rng.randint(91, 150)} and write three questions.")


def _dialogue(rng: random.Random) -> str:
    a, b = rng.sample(_NAMES, 2)
    city = rng.choice(_CITIES)
    return (f"{a}: Have you ever been to {city}?\n{b}: Once, years ago. It was "
            f"{rng.choice(_WEATHER)} the whole week.\n{a}: I am going there in "
            f"{rng.choice(('spring', 'summer', 'autumn', 'winter'))}.\n{b}: Bring "
            f"{rng.choice(_OBJECTS)}, just in case.")


TEMPLATES = (_story, _weather, _recipe, _arithmetic, _animal_fact, _lesson, _dialogue)


def generate_documents(num_generated: int = 420, seed: int = 0) -> list[str]:
    """All sample documents: the handwritten ones plus ``num_generated`` template documents,
    in a seeded shuffled order."""
    rng = random.Random(seed)
    docs = list(HANDWRITTEN)
    docs += [TEMPLATES[i % len(TEMPLATES)](rng) for i in range(num_generated)]
    rng.shuffle(docs)
    return docs
