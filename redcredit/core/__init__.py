"""The I/O-free engine: validates arguments, builds script calls, parses replies.

Imports only the foundation modules (errors, results, validation, config...).
"""
