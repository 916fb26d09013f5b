"""Integrations with other libraries; each is an optional extra, imported only on request
(`import grove_kernels.integrations.transformers`), so `import grove_kernels` needs none of them."""
