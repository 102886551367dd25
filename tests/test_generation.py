import pytest

from pefttutor import data, generation


@pytest.mark.real_models
def test_complete_batches_like_one_prompt_at_a_time(smollm2):
    model, tok = smollm2  # a session fixture: leave it in the mode it came in
    was_training = model.training
    model.train()
    try:
        _check_complete(model, tok)
    finally:
        model.train(was_training)


def _check_complete(model, tok):
    prompts = [data.restaurant_prompt(mr) for mr in (
        "name[The Eagle], food[French]", "name[Zizzi], eatType[pub], area[riverside], priceRange[cheap]", "name[Bibimbap House]")]
    batched = generation.complete(model, tok, prompts, max_new_tokens=8, batch_size=2)  # rows padded differently
    alone = [generation.complete(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == alone and all(batched)
    assert model.training  # mode restored
    chat = generation.complete(model, tok, [data.restaurant_chat_prompt(tok, "name[The Eagle]")], 4,
                               add_special_tokens=False)
    assert len(chat) == 1 and chat[0]
