"""The process's budget of DATA bytes in flight (proxy/data_budget.py)."""

from proxy.data_budget import DataBudget


def test_the_budget_takes_until_it_is_spent_and_what_is_given_back_is_free_again():
    budget = DataBudget(100)
    assert budget.take(60)
    assert not budget.take(41)  # refused: nothing of it is held
    assert budget.held == 60
    assert budget.take(40)
    assert not budget.take(1)
    budget.give_back(60)
    assert budget.take(50)
    assert budget.held == 90


def test_no_budget_takes_everything():
    budget = DataBudget(0)
    assert budget.take(10**12)
    budget.give_back(10**12)
    assert budget.held == 0


def test_giving_back_more_than_is_held_never_goes_below_zero():
    budget = DataBudget(100)
    budget.take(10)
    budget.give_back(30)
    assert budget.held == 0
    assert budget.take(100)
