package istio

import (
	"path/filepath"
	"strings"
	"testing"

	rbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"istio.io/istio/pkg/wasm"
	"mesh-filters/tests/istio/mesh"
)

// registryHost is the host:port of MESH_REGISTRY (host:port/path).
func registryHost(t *testing.T) string {
	host, _, _ := strings.Cut(env(t, "MESH_REGISTRY"), "/")
	return host
}

// TestTheAgentFetchesEveryFormatByTagAndByDigest: the WasmPlugins naming
// each image format, by tag, with the `sha256` field, and by digest in the
// url, through istiod and the agent (a fresh cache each time): every filter
// gets exactly dist/<filter>.wasm.
func TestTheAgentFetchesEveryFormatByTagAndByDigest(t *testing.T) {
	digests := pushed(t)
	for _, format := range []string{"artifact", "image", "docker"} {
		for _, pin := range []mesh.Pin{mesh.ByTag, mesh.BySha256Field, mesh.ByDigestURL} {
			t.Run(format+" "+pin.String(), func(t *testing.T) {
				yaml := manifests(t, "wasmplugins", format, pin)
				plugins, err := mesh.Plugins(yaml)
				if err != nil {
					t.Fatal(err)
				}
				plugins = inOrder(t, plugins, readmeOrder)
				g := mesh.Generate(t, yaml)
				for i, r := range g.Extensions {
					remote := wasmOf(t, mesh.ExtensionConfig(t, r)).GetConfig().GetVmConfig().GetCode().GetRemote()
					wantSha := ""
					if pin == mesh.BySha256Field {
						wantSha = digests[format][plugins[i].Filter()]
					}
					if got := strings.TrimPrefix(remote.GetSha256(), "nil"); got != wantSha {
						t.Errorf("%s: istiod sends sha256 %q, wanted %q", plugins[i].Name, remote.GetSha256(), wantSha)
					}
				}
				agent := mesh.NewAgent(t.TempDir(), registryHost(t))
				defer agent.Close()
				rewritten, err := agent.Rewrite(g.Extensions)
				if err != nil {
					t.Fatalf("the agent refused the ECDS resources: %v", err)
				}
				checkLocalModules(t, format+" "+pin.String(), rewritten, plugins)
			})
		}
	}
}

// rbacOf is the RBAC filter the agent put in place of a Wasm filter, and
// whether it allows everything (no rules) or denies everything.
func rbacOf(t *testing.T, r *anypb.Any) (allows bool) {
	t.Helper()
	ec := mesh.ExtensionConfig(t, r)
	f := &rbac.RBAC{}
	if err := ec.GetTypedConfig().UnmarshalTo(f); err != nil {
		t.Fatalf("%s: not replaced by an RBAC filter (%s)", ec.GetName(), ec.GetTypedConfig().GetTypeUrl())
	}
	switch {
	case f.GetRules() == nil && f.GetRulesStatPrefix() == wasm.DefaultAllowStatPrefix:
		return true
	case f.GetRules() != nil && len(f.GetRules().GetPolicies()) == 0 && f.GetRulesStatPrefix() == wasm.DefaultDenyStatPrefix:
		return false
	}
	t.Fatalf("%s: unexpected RBAC filter %v", ec.GetName(), f)
	return false
}

// The agent's fallback when the module cannot be had: allow-all under
// FAIL_OPEN, deny-all under FAIL_CLOSE and FAIL_RELOAD.
var fallbackAllows = map[string]bool{"FAIL_OPEN": true, "FAIL_CLOSE": false, "FAIL_RELOAD": false}

// TestAModuleThatCannotBeHadIsReplacedByRBAC: an image that does not exist
// and a digest that does not match. The agent logs the error and hands
// Envoy an RBAC filter instead of the plugin (no NACK); the Rust test loads
// the result into Envoy.
func TestAModuleThatCannotBeHadIsReplacedByRBAC(t *testing.T) {
	out := env(t, "MESH_ISTIO_OUT")
	digests := pushed(t)
	cases := map[string]func(string) string{
		"missing-image": func(yaml string) string {
			return strings.ReplaceAll(yaml, ":"+mesh.ManifestTag+"\n", ":no-such-tag\n")
		},
		"wrong-digest": func(yaml string) string {
			// The artifact's tag, pinned to the digest of the same filter's
			// `image` format.
			for _, f := range mesh.Filters {
				yaml = strings.ReplaceAll(yaml, "sha256: "+digests["artifact"][f]+"\n", "sha256: "+digests["image"][f]+"\n")
			}
			return yaml
		},
	}
	for name, edit := range cases {
		t.Run(name, func(t *testing.T) {
			pin := mesh.ByTag
			if name == "wrong-digest" {
				pin = mesh.BySha256Field
			}
			yaml := edit(manifests(t, "wasmplugins", "artifact", pin))
			plugins, err := mesh.Plugins(yaml)
			if err != nil {
				t.Fatal(err)
			}
			plugins = inOrder(t, plugins, readmeOrder)
			g := mesh.Generate(t, yaml)
			agent := mesh.NewAgent(t.TempDir(), registryHost(t))
			defer agent.Close()
			rewritten, err := agent.Rewrite(g.Extensions)
			if err != nil {
				t.Fatalf("the agent NACKs instead of falling back: %v", err)
			}
			for i, r := range rewritten {
				p := plugins[i]
				if got := rbacOf(t, r); got != fallbackAllows[p.FailStrategy] {
					t.Errorf("%s (%s): allow-all %v", p.Name, p.FailStrategy, got)
				}
			}
			// The error the agent logs, as the cache gives it.
			remote := wasmOf(t, mesh.ExtensionConfig(t, g.Extensions[0])).GetConfig().GetVmConfig().GetCode().GetRemote()
			_, err = agent.Cache.Get(remote.GetHttpUri().GetUri(), wasm.GetOptions{
				Checksum: strings.TrimPrefix(remote.GetSha256(), "nil"), RequestTimeout: remote.GetHttpUri().GetTimeout().AsDuration(),
			})
			want := map[string]string{"missing-image": "could not fetch manifest", "wrong-digest": "which does not match"}[name]
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("fetching %s: %v, wanted an error saying %q", remote.GetHttpUri().GetUri(), err, want)
			}
			writeExtensions(t, filepath.Join(out, "bad", name), rewritten, plugins)
			if err != nil {
				writeJSON(t, filepath.Join(out, "bad", name, "error.json"), err.Error())
			}
		})
	}
}

// TestARefusedPluginConfigPassesIstio: Istio's CRD accepts any fields in
// pluginConfig and istiod passes them on; only the filter (in Envoy) refuses
// them. The Rust test loads the result into Envoy.
func TestARefusedPluginConfigPassesIstio(t *testing.T) {
	out := env(t, "MESH_ISTIO_OUT")
	yaml := manifests(t, "wasmplugins", "artifact", mesh.ByTag)
	const marker = "  pluginConfig:\n"
	i := strings.Index(yaml, "name: mesh-ratelimit\n")
	j := strings.Index(yaml[i:], marker)
	if i < 0 || j < 0 {
		t.Fatal("no ratelimit pluginConfig in the manifests")
	}
	at := i + j + len(marker)
	yaml = yaml[:at] + "    max_kyes: 10\n" + yaml[at:]
	g := mesh.Generate(t, yaml)
	var ratelimit []*anypb.Any
	for _, r := range g.Extensions {
		if strings.Contains(mesh.ExtensionConfig(t, r).GetName(), "mesh-ratelimit") {
			ratelimit = append(ratelimit, r)
		}
	}
	if len(ratelimit) != 1 {
		t.Fatalf("istiod dropped the plugin: %v", g.ECDSFilters)
	}
	c := wasmOf(t, mesh.ExtensionConfig(t, ratelimit[0])).GetConfig()
	sv := &wrapperspb.StringValue{}
	if err := c.GetConfiguration().UnmarshalTo(sv); err != nil || !strings.Contains(sv.GetValue(), `"max_kyes":10`) {
		t.Errorf("istiod did not pass the field on: %s (%v)", sv.GetValue(), err)
	}
	agent := mesh.NewAgent(filepath.Join(out, "cache", "refused-config"), registryHost(t))
	defer agent.Close()
	rewritten, err := agent.Rewrite(ratelimit)
	if err != nil {
		t.Fatal(err)
	}
	plugins, err := mesh.Plugins(yaml)
	if err != nil {
		t.Fatal(err)
	}
	var ratelimitPlugin []mesh.Plugin
	for _, p := range plugins {
		if p.Name == "mesh-ratelimit" {
			ratelimitPlugin = append(ratelimitPlugin, p)
		}
	}
	writeExtensions(t, filepath.Join(out, "bad", "refused-config"), rewritten, ratelimitPlugin)
}
