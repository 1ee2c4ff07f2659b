"""The official OpenAI Python SDK, unchanged, against flowgen's /v1/images/generations.

Usage: python openai_sdk.py BASE_URL API_KEY MODEL_ID
"""
import base64
import sys

import openai

base, key, model_id = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def check_pngs(result, n):
    assert len(result.data) == n, f"wanted {n} images, got {len(result.data)}"
    for image in result.data:
        png = base64.b64decode(image.b64_json)
        assert png.startswith(b"\x89PNG"), "not a PNG"


# No model at all, the served model's id, and the "default" alias.
check_pngs(client.images.generate(prompt="7", n=2, response_format="b64_json"), 2)
check_pngs(client.images.generate(model=model_id, prompt="seven", response_format="b64_json"), 1)
check_pngs(client.images.generate(model="default", prompt="3", quality="standard", user="sdk-test"), 1)

# A model this server does not have: a clear 422 that names the field.
try:
    client.images.generate(model="dall-e-3", prompt="7")
    raise SystemExit("an unknown model was accepted")
except openai.UnprocessableEntityError as err:
    assert err.body and "model" in str(err.body), err.body

# A wrong key: the SDK's own authentication error.
try:
    openai.OpenAI(base_url=f"{base}/v1", api_key="not-a-key", max_retries=0).images.generate(prompt="7")
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError:
    pass
print(f"openai {openai.__version__}: 4 images generated through the SDK, unknown model and wrong key refused")
