"""Token-reduction methods: each module holds one method's pure selection / merging
function and how it installs (docs/method.md §4, §8, §9)."""
