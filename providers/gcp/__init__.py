"""The GCP virtual-IP provider (design.md §5) arrives with its own issue; until then the registry answers "provider 'gcp' is not available in this version"."""
