"""Shipped tuning profiles: <device key>.yaml (data only)."""
