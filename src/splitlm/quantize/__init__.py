"""Weight quantizers (per segment), KV quantizers and the activation codec."""
