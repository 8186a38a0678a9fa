"""Cloud-side kernels (DESIGN.md §9): each op a Triton kernel beside a torch reference with the
same signature; `dispatch` picks one when the tail is built."""
