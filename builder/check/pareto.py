"""The Pareto front of releases: none smaller and better at once.

    front([(4.2, 0.03), (8.1, 0.001), (8.5, 0.01)]) == [True, True, False]
"""


def dominates(a: tuple, b: tuple, higher_is_better: bool = False) -> bool:
    """a is no larger and no worse than b, and strictly one of the two (size first, quality second)."""
    size_a, size_b = a[0], b[0]
    quality_a, quality_b = (-a[1], -b[1]) if higher_is_better else (a[1], b[1])
    return size_a <= size_b and quality_a <= quality_b and (size_a < size_b or quality_a < quality_b)


def front(points: list, higher_is_better: bool = False) -> list:
    """One flag per (size, quality) point: True when no other point dominates it. Equal points are
    both on the front; quadratic, which a model's few dozen releases afford."""
    return [not any(dominates(other, point, higher_is_better) for other in points) for point in points]


def staircase(points: list, higher_is_better: bool = False) -> list:
    """The front's points joined as steps, in order of size: each step holds its quality until the
    next smaller-quality point (what one gets for at most that size)."""
    ordered = sorted(set(points), key=lambda p: (p[0], -p[1] if higher_is_better else p[1]))
    path = []
    for point in ordered:
        if path:
            path.append((point[0], path[-1][1]))
        path.append(point)
    return path
