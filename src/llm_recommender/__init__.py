"""llm_recommender: sequential recommendation with a decoder LLM over soft user/item tokens."""

__version__ = "0.1.0"
