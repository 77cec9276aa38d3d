"""Built-in callbacks: logging and progress, and training control as transition hooks."""
