from helpers.lessons.playground import Playground


def test_generate_with_a_bad_model_path_shows_the_error_and_starts_nothing():
    playground = Playground()
    playground.model_path.value = "/no/such/model"
    playground.generate()
    assert playground.message.startswith("error: No model folder at /no/such/model")
    assert playground.model is None and not playground.running
