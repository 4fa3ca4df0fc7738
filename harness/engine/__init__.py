"""One sample through the model: prefill once (collecting what the methods declared), compress per (method,
budget), then decode or score against each compressed cache (`pipeline` ties these together; `stored_context`
writes a compressed context to a file and answers from it later).
"""
