// istio-fetch runs one Wasm image through Istio's own code, as a sidecar
// would get it: a WasmPlugin naming the image goes through istiod (the
// in-memory discovery server) for a frontend sidecar, then the ECDS resource
// through the sidecar agent's fetcher and rewrite (pkg/wasm).
//
//	istio-fetch [-o FILE] [-insecure HOST[,HOST]] <oci-url> [sha256] [FAIL_OPEN|FAIL_CLOSE|FAIL_RELOAD]
//
// It prints the extension config Envoy would get (JSON) and, with -o, copies
// the fetched module to FILE. When the agent cannot fetch the module it
// prints the RBAC filter the agent puts in its place and exits 2.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"

	"istio.io/istio/pkg/log"
	"mesh-filters/tests/istio/mesh"
)

const usage = "usage: istio-fetch [-o FILE] [-insecure HOST[,HOST]] <oci-url> [sha256] [FAIL_OPEN|FAIL_CLOSE|FAIL_RELOAD]"

func main() {
	output := flag.String("o", "", "copy the fetched module to this file")
	insecure := flag.String("insecure", "", "registries to talk plain HTTP to (default: the image's host)")
	flag.Usage = func() { fmt.Fprintln(os.Stderr, usage) }
	flag.Parse()
	args := flag.Args()
	if len(args) < 1 || len(args) > 3 || !strings.HasPrefix(args[0], "oci://") {
		flag.Usage()
		os.Exit(64)
	}
	url, sha, strategy := args[0], "", "FAIL_CLOSE"
	for _, a := range args[1:] {
		if strings.HasPrefix(a, "FAIL_") {
			strategy = a
		} else {
			sha = strings.TrimPrefix(a, "sha256:")
		}
	}
	hosts := *insecure
	if hosts == "" {
		hosts, _, _ = strings.Cut(strings.TrimPrefix(url, "oci://"), "/")
	}

	plugin := fmt.Sprintf(`apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: fetched
  namespace: %s
spec:
  selector:
    matchLabels:
      app: frontend
  url: %s
  failStrategy: %s
  match:
  - mode: CLIENT
`, mesh.Namespace, url, strategy)
	if sha != "" {
		plugin += "  sha256: " + sha + "\n"
	}

	// Istio's log (the agent's error line among it) to stderr, the extension
	// config alone to stdout.
	logOptions := log.DefaultOptions()
	logOptions.OutputPaths = []string{"stderr"}
	if err := log.Configure(logOptions); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}

	failer := &mesh.CommandFailer{}
	defer failer.Close()
	g := mesh.Generate(failer, plugin)
	if len(g.Extensions) != 1 {
		failer.Fatalf("istiod made %d extension configs of the WasmPlugin", len(g.Extensions))
	}
	agent := mesh.NewAgent(failer.TempDir(), strings.Split(hosts, ",")...)
	defer agent.Close()
	rewritten, err := agent.Rewrite(g.Extensions)
	if err != nil {
		failer.Fatalf("the agent refused the extension config: %v", err)
	}
	ec := mesh.ExtensionConfig(failer, rewritten[0])
	text, err := protojson.MarshalOptions{UseProtoNames: true, Multiline: true}.Marshal(ec)
	if err != nil {
		failer.Fatal(err)
	}
	fmt.Println(string(text))

	file := mesh.LocalModule(ec)
	if file == "" {
		fmt.Fprintln(os.Stderr, "istio-fetch: the agent could not fetch the module and replaced the filter by RBAC (its log above says why)")
		failer.Close()
		os.Exit(2)
	}
	if *output != "" {
		data, err := os.ReadFile(file)
		if err != nil {
			failer.Fatal(err)
		}
		if err := os.WriteFile(*output, data, 0o644); err != nil {
			failer.Fatal(err)
		}
	}
}
