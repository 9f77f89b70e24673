"""The chat templates a recipe may name (`chat_template: chatml`): the five that mergekit 0.1.5 ships, by its names.

Each renders its format as the models trained on it expect (ChatML; Meta's Llama 3; Mistral's [INST] turns; the
Alpaca instruction format; LG's EXAONE 3.0). mergekit's own files render chatml and mistral the same, and the other
three with different whitespace: llama3 with a newline after every turn, exaone with the indentation of its file, alpaca
without the blank line before the last "### Response:" and with two leading newlines when there is no system message.
"""

from __future__ import annotations

NAMED_CHAT_TEMPLATES: dict[str, str] = {
    "alpaca": (  # the last system message, then the turns, a blank line between them
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{% if system %}{{ system[-1]['content'] | trim + '\n\n' }}{% endif %}"
        "{% set headings = {'user': '### Instruction:', 'user_context': '### Input:', 'assistant': '### Response:'} %}"
        "{% for message in messages | selectattr('role', 'in', ['user', 'user_context', 'assistant']) %}"
        "{% if not loop.first %}{{ '\n\n' }}{% endif %}"
        "{{ headings[message['role']] + '\n' + message['content'] | trim }}"
        "{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{{ ('\n\n' if messages else '') + '### Response:\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{{ '\n' if message['role'] == 'user' else '[|endofturn|]\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (  # an optional system message, folded into the first user turn; then user/assistant alternating
        "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
        "{{ bos_token }}"
        "{% for message in (messages[1:] if system is not none else messages) %}"
        "{% if message['role'] != ('user' if loop.index0 is even else 'assistant') %}"
        "{{ raise_exception('after the optional system message, the roles alternate user/assistant/user/...') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ ' [INST] ' + (system + '\n\n' if loop.first and system is not none else '') + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}
