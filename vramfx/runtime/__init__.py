"""Runtime: the ops the rewritten graph calls, and the engines that move weights for them."""
