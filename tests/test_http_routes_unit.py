"""Unit tests of faasd.triggers.http's routes: what a path template matches, and which routes clash."""

from __future__ import annotations

from faasd.triggers.http import Route, claim, compile_template


def route(function: str, template: str, methods: tuple[str, ...] = ("ANY",)) -> Route:
    pattern, literal = compile_template(template)
    return Route(function, template, frozenset(methods), pattern, literal)


def test_a_parameter_is_a_whole_segment_and_braces_inside_one_are_literal():
    thumbs, files = route("a", "/thumbs/{id}"), route("a", "/files/{path+}")
    assert thumbs.pattern.match("/thumbs/7")["id"] == "7"
    assert not thumbs.pattern.match("/thumbs/7/8")
    assert files.pattern.match("/files/a/b.txt")["path"] == "a/b.txt"
    literal = route("a", "/v1/x{id}")
    assert literal.pattern.match("/v1/x{id}") and not literal.pattern.match("/v1/x7")


def test_routes_that_differ_only_in_their_parameters_names_clash_and_literal_ones_do_not():
    first, renamed, greedy = route("a", "/thumbs/{id}"), route("b", "/thumbs/{name}/"), route("c", "/thumbs/{rest+}")
    # Braces inside a segment are literal text: these two serve different paths.
    braced, other_braced = route("d", "/v1/x{id}"), route("e", "/v1/x{name}")
    kept, conflicts = claim([[first], [renamed], [greedy], [braced], [other_braced]])
    assert kept == [first, greedy, braced, other_braced]
    assert conflicts == {"b": ["http trigger path '/thumbs/{name}/' is already the route of function 'a'; "
                               "it is not served here"]}
