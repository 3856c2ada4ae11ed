"""Qualification: score and checklist from the lead's facts, its title and the reply."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from worker.config import Fit, Qualification
from worker.models import Lead
from worker.qualify import LeadFacts, QualificationResult, qualify

# The contract's example section.
Q = Qualification(
    fit=Fit(
        industries=("software", "saas", "fintech"),
        min_company_size=20,
        min_annual_revenue=1_000_000,
        countries=(),
    ),
    authority_titles=("ceo", "cto", "cfo", "founder", "owner", "vp", "head of", "director"),
    intent_phrases=("pricing", "price", "quote", "demo", "trial", "budget", "proposal"),
)


def facts(**fields: object) -> LeadFacts:
    values: dict[str, object] = {
        "email": "dana@acme.example",
        "title": None,
        "company": "Acme",
        "industry": None,
        "company_size": None,
        "annual_revenue": None,
        "country": None,
    }
    values.update(fields)
    return LeadFacts(**values)  # type: ignore[arg-type]


def lines(result: QualificationResult) -> dict[str, tuple[str, str]]:
    return {c.criterion: (c.status, c.evidence) for c in result.checklist}


def test_it_scores_a_fitting_cto_asking_for_pricing_at_the_top() -> None:
    lead = facts(
        title="CTO", industry="SaaS", company_size=250, annual_revenue=12_000_000, country="DE"
    )
    result = qualify(lead, "Hi, could you send pricing and book a demo next week?", Q)

    assert result.score == 100
    assert result.fit is True
    assert [c.criterion for c in result.checklist] == [
        "industry",
        "company_size",
        "annual_revenue",
        "authority",
        "intent",
    ]  # countries: [] means any, so no country line
    checklist = lines(result)
    assert checklist["industry"] == ("met", "industry SaaS is in the target list")
    assert checklist["company_size"] == ("met", "company size 250 is at least 20")
    assert checklist["annual_revenue"] == ("met", "annual revenue 12,000,000 is at least 1,000,000")
    assert checklist["authority"] == ("met", "title 'CTO' matches 'cto'")
    assert checklist["intent"] == ("met", "reply mentions 'pricing', 'demo'")
    assert result.as_json() == {
        "score": 100,
        "fit": True,
        "checklist": [
            {"criterion": c.criterion, "status": c.status, "evidence": c.evidence, "weight": w}
            for c, w in zip(result.checklist, [17, 17, 16, 20, 30], strict=True)
        ],
    }


def test_it_gives_partial_credit_for_a_fitting_lead_without_authority_or_intent() -> None:
    lead = facts(
        title="Marketing Manager", industry="fintech", company_size=40, annual_revenue=2_000_000
    )
    result = qualify(lead, "Thanks, sounds interesting. Who else uses this?", Q)

    assert result.score == 50
    assert result.fit is True
    assert lines(result)["authority"] == (
        "not_met",
        "title 'Marketing Manager' matches none of the authority titles",
    )
    assert lines(result)["intent"] == ("not_met", "reply mentions none of the intent phrases")


def test_it_marks_facts_the_lead_lacks_as_unknown_without_failing_fit() -> None:
    result = qualify(facts(), "Send me a quote please", Q)

    checklist = lines(result)
    assert checklist["industry"] == ("unknown", "industry not known")
    assert checklist["company_size"] == ("unknown", "company size not known")
    assert checklist["annual_revenue"] == ("unknown", "annual revenue not known")
    assert checklist["authority"] == ("unknown", "job title not known")
    assert checklist["intent"] == ("met", "reply mentions 'quote'")
    assert result.score == 30
    assert result.fit is True


def test_it_does_not_take_mvp_for_vp() -> None:
    assert lines(qualify(facts(title="MVP Lead"), "", Q))["authority"][0] == "not_met"
    assert lines(qualify(facts(title="VP Finance"), "", Q))["authority"] == (
        "met",
        "title 'VP Finance' matches 'vp'",
    )
    assert lines(qualify(facts(title="Co-Founder & CEO"), "", Q))["authority"] == (
        "met",
        "title 'Co-Founder & CEO' matches 'ceo', 'founder'",
    )
    assert lines(qualify(facts(title="Head  of Sales"), "", Q))["authority"][0] == "met"
    assert lines(qualify(facts(title="Headhunter"), "", Q))["authority"][0] == "not_met"


def test_it_finds_intent_only_as_whole_words_in_any_case() -> None:
    assert lines(qualify(facts(), "What are your PRICES?", Q))["intent"] == (
        "met",
        "reply mentions 'price'",
    )
    # "demographic" is not "demo", "budgetary" is not "budget".
    assert lines(qualify(facts(), "Our demographic is budgetary folks.", Q))["intent"][0] == (
        "not_met"
    )


def test_it_leaves_out_criteria_the_config_does_not_ask_about() -> None:
    q = Qualification(
        fit=Fit(industries=(), min_company_size=None, min_annual_revenue=None, countries=("ES",)),
        authority_titles=(),
        intent_phrases=("demo",),
    )
    result = qualify(facts(country="es", title="CEO", industry="mining"), "a demo?", q)

    assert [(c.criterion, c.status, c.weight) for c in result.checklist] == [
        ("country", "met", 63),
        ("intent", "met", 37),  # 62.5 and 37.5: the tie goes to the earlier
    ]
    assert result.score == 100
    assert lines(result)["country"] == ("met", "country ES is in the target list")


def test_it_scores_zero_when_nothing_is_configured() -> None:
    q = Qualification(fit=Fit(), authority_titles=(), intent_phrases=())
    result = qualify(facts(title="CEO"), "pricing", q)

    assert result.checklist == ()
    assert result.score == 0
    assert result.fit is True


def test_it_is_not_a_fit_when_the_industry_is_outside_the_list() -> None:
    lead = facts(
        title="CEO", industry="Retail", company_size=500, annual_revenue=50_000_000, country="US"
    )
    result = qualify(lead, "Let's talk pricing and a demo.", Q)

    assert result.fit is False
    assert lines(result)["industry"] == (
        "not_met",
        "industry Retail is not in the target list (software, saas, fintech)",
    )
    assert result.score == 100 - 17  # everything else met


def test_it_counts_a_threshold_as_a_minimum() -> None:
    at_minimum = qualify(facts(industry="saas", company_size=20), "", Q)
    below = qualify(facts(industry="saas", company_size=19), "", Q)

    assert lines(at_minimum)["company_size"] == ("met", "company size 20 is at least 20")
    assert at_minimum.fit is True
    assert lines(below)["company_size"] == ("not_met", "company size 19 is below 20")
    assert below.fit is False


def test_it_is_not_a_fit_below_the_minimum_score() -> None:
    q = Q.model_copy(update={"min_score": 60})
    lead = facts(industry="software", company_size=30, annual_revenue=3_000_000)

    assert qualify(lead, "ok", q).fit is False  # 50 points
    assert qualify(lead, "ok, send a proposal", q).fit is True  # 80 points


@given(
    title=st.one_of(st.none(), st.text(max_size=30)),
    industry=st.one_of(st.none(), st.sampled_from(["software", "Retail", ""])),
    size=st.one_of(st.none(), st.integers(-10, 10_000)),
    revenue=st.one_of(st.none(), st.integers(0, 10**10)),
    country=st.one_of(st.none(), st.sampled_from(["ES", "de", "US"])),
    reply=st.text(max_size=200),
    fit_industries=st.lists(st.sampled_from(["software", "saas", " "]), max_size=3),
    min_size=st.one_of(st.none(), st.integers(0, 1000)),
    countries=st.lists(st.sampled_from(["ES", "MX"]), max_size=2),
    titles=st.lists(st.sampled_from(["ceo", "vp", "head of", ""]), max_size=3),
    phrases=st.lists(st.sampled_from(["demo", "price", "quote"]), max_size=3),
)
def test_it_keeps_the_score_between_0_and_100(
    title: str | None,
    industry: str | None,
    size: int | None,
    revenue: int | None,
    country: str | None,
    reply: str,
    fit_industries: list[str],
    min_size: int | None,
    countries: list[str],
    titles: list[str],
    phrases: list[str],
) -> None:
    q = Qualification(
        fit=Fit(
            industries=tuple(fit_industries),
            min_company_size=min_size,
            min_annual_revenue=100_000,
            countries=tuple(countries),
        ),
        authority_titles=tuple(titles),
        intent_phrases=tuple(phrases),
    )
    lead = facts(
        title=title, industry=industry, company_size=size, annual_revenue=revenue, country=country
    )
    result = qualify(lead, reply, q)

    assert 0 <= result.score <= 100
    assert sum(c.weight for c in result.checklist) == (100 if result.checklist else 0)
    assert result.score == sum(c.weight for c in result.checklist if c.status == "met")


def test_it_snapshots_a_lead_row() -> None:
    at = datetime(2026, 12, 1, tzinfo=UTC)
    row = Lead(
        email="sam@acme.example",
        title="Director of IT",
        company="Acme",
        industry="software",
        company_size=80,
        annual_revenue=None,
        country="ES",
        domain="acme.example",
        reply_token="T" * 16,
        created_at=at,
        updated_at=at,
    )
    lead = LeadFacts.of(row)

    assert lead == facts(
        email="sam@acme.example",
        title="Director of IT",
        industry="software",
        company_size=80,
        country="ES",
    )
    assert lines(qualify(lead, "", Q))["authority"] == (
        "met",
        "title 'Director of IT' matches 'director'",
    )
