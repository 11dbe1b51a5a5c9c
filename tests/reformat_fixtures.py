"""Real-shaped raw result lines for the reformat_results.py tests.

Bodies follow the OpenAI API reference and what the Batch API returns;
vLLM lines follow vllm/entrypoints/openai/run_batch.py; fine-tuned lines follow the
generations contract of generate_data_finetuned.py. Written by hand on purpose.
"""

from __future__ import annotations

import copy


def chat_body(content="Paris is the capital of France.", finish_reason="stop", *, refusal=None,
              model="gpt-4o-mini-2024-07-18", prompt_tokens=14, completion_tokens=7):
    return {
        "id": "chatcmpl-AXnP2dQmF1bq3H9aX0yZ7rT5",
        "object": "chat.completion",
        "created": 1732531200,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": refusal, "annotations": []},
            "logprobs": None,
            "finish_reason": finish_reason,
        }],
        "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        },
        "service_tier": "default",
        "system_fingerprint": "fp_0ba0d124f1",
    }


def chat_body_n(texts, finish_reasons=None):
    body = chat_body()
    finish_reasons = finish_reasons or ["stop"] * len(texts)
    body["choices"] = [{"index": i, "message": {"role": "assistant", "content": t, "refusal": None,
                                                "annotations": []},
                        "logprobs": None, "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish_reasons))]
    return body


RESPONSES_BODY = {
    "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
    "object": "response",
    "created_at": 1741476542,
    "status": "completed",
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "max_output_tokens": None,
    "model": "o4-mini-2025-04-16",
    "output": [
        {"id": "rs_6820f383d7c08191846711c5df8233bc", "type": "reasoning", "summary": []},
        {"type": "message", "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e6", "status": "completed",
         "role": "assistant",
         "content": [{"type": "output_text", "text": "Paris is the capital", "annotations": []},
                     {"type": "output_text", "text": " of France.", "annotations": []}]},
    ],
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": "medium", "summary": None},
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
    "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 87,
              "output_tokens_details": {"reasoning_tokens": 64}, "total_tokens": 123},
    "user": None,
    "metadata": {},
}

COMPLETIONS_BODY = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "created": 1589478378,
    "model": "gpt-3.5-turbo-instruct",
    "system_fingerprint": "fp_44709d6fcb",
    "choices": [{"text": "\n\nThis is indeed a test", "index": 0, "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}

EMBEDDINGS_BODY = {
    "object": "list",
    "data": [{"object": "embedding", "embedding": [0.0023064255, -0.009327292, -0.0028842222], "index": 0}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}


def ok_line(custom_id, body, n=0):
    return {"id": f"batch_req_{n:024x}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"req_{n:032x}", "body": copy.deepcopy(body)},
            "error": None}


def expired_line(custom_id, n=0, code="batch_expired",
                 message="This request could not be executed before the completion window expired."):
    return {"id": f"batch_req_{n:024x}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def http_error_line(custom_id, n=0, status=400, code="context_length_exceeded",
                    message="This model's maximum context length is 128000 tokens."):
    return {"id": f"batch_req_{n:024x}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{n:032x}",
                         "body": {"error": {"message": message, "type": "invalid_request_error",
                                            "param": "messages", "code": code}}},
            "error": None}


VLLM_BODY = {
    "id": "chatcmpl-3f6d3a8b4c2e4e7f9a1b2c3d4e5f6a7b",
    "object": "chat.completion",
    "created": 1732531200,
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "choices": [{"index": 0,
                 "message": {"role": "assistant", "reasoning_content": None, "content": "Hello there!",
                             "tool_calls": []},
                 "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
    "usage": {"prompt_tokens": 12, "total_tokens": 15, "completion_tokens": 3, "prompt_tokens_details": None},
    "prompt_logprobs": None,
}


def vllm_ok_line(custom_id):
    return {"id": "vllm-9b1e0c5a2f4d4c0b8e7a6d5c4b3a2f10", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": "vllm-batch-0d1e2f3a4b5c", "body": copy.deepcopy(VLLM_BODY)},
            "error": None}


def vllm_error_line(custom_id, error="The model does not support Chat Completions API"):
    return {"id": "vllm-1c2d3e4f5a6b4c7d8e9f0a1b2c3d4e5f", "custom_id": custom_id,
            "response": {"status_code": 400, "request_id": "vllm-batch-6a7b8c9d0e1f", "body": None},
            "error": error}


GENERATION = {"max_new_tokens": 64, "do_sample": False, "temperature": None, "top_p": None, "seed": 0,
              "batch_size": 16}


def ft_line(custom_id, text="Paris.", finish_reason="stop", *, samples=None, prompt_tokens=14,
            completion_tokens=3):
    line = {"custom_id": custom_id, "generated_text": text, "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    if samples is not None:
        line["samples"] = samples
    line.update({"source": "finetuned", "model": "Qwen/Qwen2.5-0.5B-Instruct", "adapter": "out/lora-v1",
                 "adapter_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                 "generation": dict(GENERATION), "created": 1732531200})
    return line


def batch_line(custom_id, content, model="gpt-4o-mini"):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}]}}
