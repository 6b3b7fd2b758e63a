"""Write a JSONL of synthetic math word problems for configs/math_grpo.yaml: fractions, percentages,
rates and one-step equations whose answers are fractions or decimals, so that grading them takes
math (the `math_answer` reward: \\frac{3}{8}, 3/8 and 0.375 are one answer), not string matching.

Each line has `prompt` (asking for reasoning in <think> tags and the answer in \\boxed{}), `answer`
(LaTeX) and `completion` (a short worked answer in that format, for an SFT warm start). The same
--seed writes the same file; nothing is downloaded.

    python examples/make_math_data.py --out data/math.jsonl --n 2000
"""

import argparse
import json
import os
import random
from fractions import Fraction

INSTRUCTION = "Reason step by step inside <think> </think> tags, then give the final answer in \\boxed{}."
INGREDIENTS = ("flour", "sugar", "milk", "oats", "rice", "butter")
SCALES = {"half": Fraction(1, 2), "a third of": Fraction(1, 3), "double": Fraction(2),
          "one and a half times": Fraction(3, 2)}
NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana")


def latex(q: Fraction) -> str:
    """`q` as a final answer: an integer, a terminating decimal (37.5) or a \\frac."""
    if q.denominator == 1:
        return str(q.numerator)
    d = q.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d == 1:  # the denominator divides a power of ten: the decimal is exact
        return f"{float(q):.10f}".rstrip("0")
    sign = "-" if q < 0 else ""
    return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def recipe(rng: random.Random) -> tuple[str, str, Fraction]:
    """Scale a fractional amount: 3/4 cup for half the recipe is 3/8 cup."""
    amount = Fraction(rng.randint(1, 7), rng.choice((2, 3, 4, 8)))
    (scale_name, scale), ingredient = rng.choice(sorted(SCALES.items())), rng.choice(INGREDIENTS)
    cups = "cup" if amount <= 1 else "cups"
    question = (f"A recipe uses {amount} {cups} of {ingredient}. How many cups of {ingredient} are needed for "
                f"{scale_name} the recipe?")
    return question, f"{amount} * {scale} = {amount * scale}", amount * scale


def discount(rng: random.Random) -> tuple[str, str, Fraction]:
    """A price after a percentage off, in dollars (often a decimal)."""
    price, percent = rng.randint(8, 120), rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 75))
    sale = Fraction(price * (100 - percent), 100)
    question = f"A jacket costs ${price}. It is on sale for {percent}% off. What is the sale price in dollars?"
    return question, f"{price} * (100 - {percent})/100 = {latex(sale)}", sale


def rate(rng: random.Random) -> tuple[str, str, Fraction]:
    """Work at a constant rate: pages read in a given time."""
    pages, minutes, later = rng.randint(2, 30), rng.randint(3, 40), rng.randint(5, 90)
    name = rng.choice(NAMES)
    read = Fraction(pages * later, minutes)
    question = (f"{name} reads {pages} pages in {minutes} minutes. At the same rate, how many pages does {name} "
                f"read in {later} minutes?")
    return question, f"{pages}/{minutes} pages a minute * {later} minutes = {read}", read


def share(rng: random.Random) -> tuple[str, str, Fraction]:
    """A part of a whole as a reduced fraction."""
    girls, boys = rng.randint(1, 30), rng.randint(1, 30)
    part = Fraction(girls, girls + boys)
    question = f"A class has {girls} girls and {boys} boys. What fraction of the class are girls?"
    return question, f"{girls}/({girls} + {boys}) = {part}", part


def equation(rng: random.Random) -> tuple[str, str, Fraction]:
    """A one-step linear equation a·x + b = c."""
    a, b, c = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-20, 40)
    x = Fraction(c - b, a)
    sign = "+" if b >= 0 else "-"
    question = f"Solve for x: {a}x {sign} {abs(b)} = {c}."
    return question, f"{a}x = {c - b}, so x = {x}", x


TEMPLATES = (recipe, discount, rate, share, equation)


def example(rng: random.Random) -> dict:
    """One problem: prompt, LaTeX answer, and a worked completion in the rewarded format."""
    question, work, value = rng.choice(TEMPLATES)(rng)
    answer = latex(value)
    completion = f"<think>\n{work}\n</think>\nThe answer is $\\boxed{{{answer}}}$."
    return {"prompt": f"{question}\n{INSTRUCTION}", "answer": answer, "completion": completion}


def main(argv=None) -> None:
    """Write --n problems to --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the .jsonl file to write")
    parser.add_argument("--n", type=int, default=2000, help="number of problems")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as file:
        for _ in range(args.n):
            file.write(json.dumps(example(rng)) + "\n")
    print(f"wrote {args.n} problems to {args.out}")


if __name__ == "__main__":
    main()
